"""Pure helpers of the FHIR REST API: URLs, search parameters, paging links, ids. No IO.

What the client sends and follows is decided here, in plain functions with doctests: how a
link the server gave resolves against the base, which origin may see the token, how search
parameters become a query, where the next page is, and which ids and type names may go into a
request path (anything else could change it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

JsonObject = dict[str, Any]
SearchParams = Mapping[str, str | Sequence[str]]


@dataclass(frozen=True)
class ReadLimits:
    """How much one client reads from a server it does not control (a server sending endless
    `next` links or huge bodies would otherwise hold a worker and its memory for good).

    Pages and resources are per search; bytes are per response body (reads, search pages) and per
    attachment. Reaching a page or resource cap ends the search with what was read (the caller
    names it as truncated); a body over its byte cap is abandoned at the cap, never read whole.
    """

    max_pages: int = 100
    max_resources: int = 10_000
    max_response_bytes: int = 32 * 1024 * 1024
    max_attachment_bytes: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_pages", "max_resources", "max_response_bytes", "max_attachment_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class SearchResults(list[JsonObject]):
    """The resources of one search; `truncated` says which cap ended it early (None: read whole)."""

    truncated: str | None = None


def url_without_query(url: httpx.URL | str) -> str:
    """The URL with its query string and fragment removed (what errors carry and logs may show).

    >>> url_without_query("http://h:8080/fhir/Patient?name=Smith#x")
    'http://h:8080/fhir/Patient'
    """
    return str(httpx.URL(url).copy_with(query=None, fragment=None))


def resolve_url(base_url: str, link: str) -> str:
    """Resolve a link the server gave against the FHIR base URL.

    Absolute links are kept verbatim; `/path` is taken on the base's origin; anything else is
    relative to the base itself (FHIR's `[base]/Type?...`), not to its parent as RFC 3986 would.

    >>> resolve_url("http://h/fhir", "Patient?page=2")
    'http://h/fhir/Patient?page=2'
    >>> resolve_url("http://h/fhir", "?_getpages=abc")
    'http://h/fhir?_getpages=abc'
    >>> resolve_url("http://h/fhir", "/other/Binary/1")
    'http://h/other/Binary/1'
    >>> resolve_url("http://h/fhir", "https://x/fhir/Patient?page=2")
    'https://x/fhir/Patient?page=2'
    """
    link = link.strip()
    parsed = httpx.URL(link)
    if parsed.is_absolute_url:
        return link
    if link.startswith("/"):
        return str(httpx.URL(base_url).copy_with(raw_path=link.encode("ascii")))
    if link.startswith("?") or not link:
        return base_url + link
    return f"{base_url}/{link}"


def same_origin(a: httpx.URL | str, b: httpx.URL | str) -> bool:
    """True when both URLs share scheme, host and (effective) port.

    >>> same_origin("https://h/fhir", "https://h:443/other")
    True
    >>> same_origin("https://h/fhir", "https://evil.example/fhir")
    False
    """
    ua, ub = httpx.URL(a), httpx.URL(b)
    return (ua.scheme, ua.host, _port(ua)) == (ub.scheme, ub.host, _port(ub))


def within_base(url: httpx.URL | str, base_url: httpx.URL | str) -> bool:
    """True when `url` is the FHIR base itself or below it: same origin and the base's path as a
    whole-segment prefix. The server's token is for its FHIR API, not for every path on its host.

    The raw (still percent-encoded) path is compared, and `.`/`..` segments in any spelling are
    refused, so neither `r4%2Fx` nor `r4/%2e%2e/admin` passes as a path under `r4`.

    >>> base = "https://ehr.example/fhir/r4"
    >>> within_base("https://ehr.example/fhir/r4/Patient/1", base), within_base(base, base)
    (True, True)
    >>> within_base("https://ehr.example/admin", base), within_base("https://ehr.example/fhir/r4x", base)
    (False, False)
    >>> within_base("https://ehr.example/fhir/r4/%2e%2e/admin", base)
    False
    """
    ua, ub = httpx.URL(url), httpx.URL(base_url)
    if not same_origin(ua, ub):
        return False
    path = ua.raw_path.split(b"?", 1)[0]
    base = ub.raw_path.split(b"?", 1)[0].rstrip(b"/")
    if path.rstrip(b"/") != base and not path.startswith(base + b"/"):
        return False
    return not any(segment in (".", "..") for segment in ua.path.split("/"))


def _port(url: httpx.URL) -> int | None:
    if url.port is not None:
        return url.port
    return {"http": 80, "https": 443}.get(url.scheme)


def search_query(params: SearchParams | None, page_size: int) -> list[tuple[str, str]]:
    """Search parameters as ordered pairs, repeated keys for lists, `_count` added unless given.

    >>> search_query({"patient": "1", "code": ["a", "b"]}, 50)
    [('patient', '1'), ('code', 'a'), ('code', 'b'), ('_count', '50')]
    >>> search_query({"_count": "10"}, 50)
    [('_count', '10')]
    """
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if isinstance(value, str):
            pairs.append((key, value))
        else:
            pairs.extend((key, str(item)) for item in value)
    if not any(key == "_count" for key, _ in pairs):
        pairs.append(("_count", str(page_size)))
    return pairs


def next_link(bundle: JsonObject) -> str | None:
    """The URL of `link[relation=next]`, if the Bundle has one.

    >>> next_link({"link": [{"relation": "self", "url": "a"}, {"relation": "next", "url": "b"}]})
    'b'
    >>> next_link({"link": []}) is None
    True
    """
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url.strip():
                return url
    return None


def bundle_resources(bundle: JsonObject) -> list[JsonObject]:
    """`entry[].resource` of every entry (search.mode match and include alike)."""
    resources: list[JsonObject] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.append(resource)
    return resources


def resource_key(resource: JsonObject) -> str | None:
    """`resourceType/id`, or None when the resource has no id (it cannot be de-duplicated)."""
    rid = resource.get("id")
    if rid is None:
        return None
    return f"{resource.get('resourceType')}/{rid}"


def check_type(resource_type: str) -> str:
    """`resource_type` when it is a FHIR resource type name (it goes into the request path).

    >>> check_type("Patient")
    'Patient'
    """
    if not resource_type.isascii() or not resource_type.isalpha() or not resource_type[:1].isupper():
        raise ValueError(f"resource type {resource_type!r} is not a FHIR resource type name")
    return resource_type


def type_of(resource: JsonObject, what: str) -> str:
    """The checked `resourceType` of a resource about to be written (`what` names the write)."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise ValueError(f"{what}: the resource has no resourceType")
    return check_type(resource_type)


def check_id(value: str, field: str) -> str:
    """`value` when it is a FHIR id ([A-Za-z0-9-.]{1,64}); `field` names it in the error."""
    # Anything else could change the request path.
    ok = 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in value)
    if not ok:
        raise ValueError(f"{field} {value!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})")
    return value


def tokenless_refusal(
    url: httpx.URL | str, base_url: httpx.URL | str, extra_hosts: Sequence[str]
) -> str | None:
    """Why a file read without the token (Bulk Data `requiresAccessToken: false`) is refused, or None.

    Such a URL comes from the server's manifest and could point anywhere (an internal address, a
    tracking host): only https on the FHIR server's own host, or on a host the deployment lists,
    is read. A plain-http file is accepted only from an http FHIR server's own host.

    >>> base = "https://ehr.example/fhir"
    >>> tokenless_refusal("https://ehr.example:9443/files/p.ndjson", base, ())
    >>> tokenless_refusal("https://store.example/p.ndjson?sig=1", base, ("store.example",))
    >>> tokenless_refusal("https://store.example/p.ndjson", base, ())
    'host store.example is not the FHIR server host and not in fhir.bulk_file_hosts'
    >>> tokenless_refusal("http://ehr.example/files/p.ndjson", base, ())
    'not https'
    >>> tokenless_refusal("http://127.0.0.1:9000/p.ndjson", "http://127.0.0.1:8080/fhir", ())
    """
    target, base = httpx.URL(url), httpx.URL(base_url)
    own_host = target.host == base.host
    if target.scheme != "https" and not (own_host and target.scheme == base.scheme == "http"):
        return "not https"
    allowed = {h.strip().lower() for h in extra_hosts if h.strip()}
    if not own_host and target.host.lower() not in allowed:
        return f"host {target.host} is not the FHIR server host and not in fhir.bulk_file_hosts"
    return None
