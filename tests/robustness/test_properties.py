"""Property tests: the parts that read what others wrote (FHIR resources, model output, attachment
bytes) never crash on it; they skip it and say why, as their modules document.

- `normalize` on a real Synthea record in which one resource was mutated (a field deleted or
  replaced by another JSON value, a wrong type, a huge or exotic string), read the way a server's
  answer is read (`fetch_record` over a `BundleSource`): a context comes out, bad resources land
  in `skipped` by reference.
- `parse_claims` on random text and JSON-like output, cut anywhere: claims and dropped claims,
  never an exception.
- `decode_text` on random bytes under random content types and charsets: text, or
  `UnsupportedContent` (the one error its module documents), never LookupError, UnicodeError.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_adapters.bundle_source import BundleSource, read_bundle, server_view
from fhir_adapters.fetch import fetch_record
from fhir_adapters.normalize import normalize
from fhir_adapters.text import UnsupportedContent, decode_text
from service.grounding import parse_claims
from tests.robustness.conftest import FIGURES, PROFILE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "synthea"
BUNDLE = FIXTURES / "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
odd_strings = st.one_of(
    st.text(max_size=200),
    st.just("x" * 200_000),
    st.just("\u202e\u0000\ud7ff\U0010ffff" * 50),
    st.just("2020-13-45T99:99:99Z"),
    st.just("Patient/../../etc"),
)
replacements = st.one_of(json_values, odd_strings)


@cache
def _resources() -> tuple[dict[str, Any], ...]:
    return tuple(server_view(read_bundle(BUNDLE)))


def _patient_id(resources: list[dict[str, Any]]) -> str:
    return next(str(r["id"]) for r in resources if r.get("resourceType") == "Patient")


def _mutate(data: st.DataObject, resource: dict[str, Any], *, keep: frozenset[str]) -> str:
    """Change one element somewhere inside `resource` (in place); returns the path changed."""
    node: Any = resource
    path: list[str] = []
    while True:
        if isinstance(node, dict):
            keys = sorted(k for k in node if not (node is resource and k in keep))
        elif isinstance(node, list):
            keys = list(range(len(node)))
        else:
            keys = []
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        stop = not isinstance(child, dict | list) or data.draw(st.booleans())
        if stop:
            path.append(str(key))
            if data.draw(st.booleans()) and isinstance(node, dict):
                del node[key]
                return ".".join(path) + " deleted"
            node[key] = data.draw(replacements)
            return ".".join(path) + " replaced"
        path.append(str(key))
        node = child
    if isinstance(node, dict):
        node[data.draw(st.text(max_size=10))] = data.draw(replacements)
    return ".".join(path) + " extended"


@given(data=st.data())
@settings(PROFILE, max_examples=min(PROFILE.max_examples, 30))
def test_normalize_never_crashes_on_a_mutated_real_record(data: st.DataObject) -> None:
    resources = [copy.deepcopy(r) for r in _resources()]
    patient_id = _patient_id(resources)
    mutations = []
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(resources) - 1))
        target = resources[index]
        # The Patient read by id stays the Patient of that id: everything else about it may be wrong.
        keep = frozenset({"resourceType", "id"}) if target.get("resourceType") == "Patient" else frozenset()
        mutations.append(f"{target.get('resourceType')}#{index}: {_mutate(data, target, keep=keep)}")
    FIGURES["properties: mutated records normalized"] += 1

    record = asyncio.run(fetch_record(BundleSource(resources), patient_id))
    context = normalize(record)

    assert context.facts[0].key == "P1", mutations
    assert all(s.resource and s.reason for s in context.skipped), mutations


free_text = st.text(max_size=300)
claim_like = st.fixed_dictionaries(
    {"text": st.one_of(st.text(max_size=80), json_values)},
    optional={"citations": st.one_of(st.lists(st.text(max_size=6), max_size=4), json_values)},
)
json_output = st.one_of(
    st.builds(
        lambda cs: json.dumps({"claims": cs}), st.lists(st.one_of(claim_like, json_values), max_size=5)
    ),
    st.builds(
        lambda cs: json.dumps({"statements": cs}),
        st.lists(st.one_of(st.text(max_size=40), json_values), max_size=5),
    ),
    st.builds(json.dumps, json_values),
)
model_output = st.one_of(
    free_text,
    json_output,
    # cut off anywhere (max_tokens), or wrapped in prose
    st.builds(lambda doc, cut: doc[: max(0, len(doc) - cut)], json_output, st.integers(0, 60)),
    st.builds(lambda pre, doc, post: f"{pre}{doc}{post}", free_text, json_output, free_text),
    st.integers(1, 50_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 50_000).map(lambda depth: '{"claims": ' + "[" * depth),
)


@given(
    output=model_output, cite=st.one_of(st.none(), st.just("N1"), st.text(max_size=5)), lines=st.booleans()
)
@settings(PROFILE)
def test_parse_claims_never_crashes_on_model_output(output: str, cite: str | None, lines: bool) -> None:
    FIGURES["properties: model outputs parsed"] += 1
    claims, dropped = parse_claims(output, cite=cite, lines=lines)
    assert all(isinstance(c.text, str) for c in claims)
    assert all(isinstance(d.reason, str) and d.reason for d in dropped)


# Codecs Python knows that are not text encodings (bytes-to-bytes, str-to-str): a Content-Type
# naming one must be refused like an unknown charset.
NOT_TEXT_CODECS = ["zlib", "base64", "hex", "bz2", "uu", "quopri", "rot13", "zip", "base_64"]
TEXT_CODECS = [
    "utf-8",
    "UTF-16",
    "utf-32-be",
    "latin-1",
    "cp1252",
    "utf-7",
    "shift_jis",
    "idna",
    "punycode",
    "unicode_escape",
]
media_types = st.one_of(
    st.sampled_from(
        ["text/plain", "text/html", "text/markdown", "application/xhtml+xml", "application/pdf", ""]
    ),
    st.text(max_size=20),
)
charsets = st.one_of(st.none(), st.sampled_from(NOT_TEXT_CODECS + TEXT_CODECS), st.text(max_size=12))


@st.composite
def content_types(draw: st.DrawFn) -> str | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.one_of(st.none(), st.text(max_size=40)))
    media, charset = draw(media_types), draw(charsets)
    return media if charset is None else f"{media}; charset={charset}"


def _decodes_or_refuses(content: bytes, content_type: str | None) -> None:
    try:
        text = decode_text(content, content_type)
    except UnsupportedContent as exc:
        assert str(exc)
    else:
        assert isinstance(text, str)


@given(
    content=st.one_of(st.binary(max_size=400), st.text(max_size=100).map(str.encode)),
    content_type=content_types(),
)
@settings(PROFILE, max_examples=PROFILE.max_examples * 3)
def test_decode_text_gives_text_or_unsupported_content_for_any_bytes(
    content: bytes, content_type: str | None
) -> None:
    FIGURES["properties: attachments decoded"] += 1
    _decodes_or_refuses(content, content_type)


@pytest.mark.parametrize("charset", NOT_TEXT_CODECS)
def test_a_charset_naming_a_codec_that_is_not_a_text_encoding_is_unsupported_content(charset: str) -> None:
    codecs.lookup(charset)  # Python knows it: only the text-encoding check can refuse it
    with pytest.raises(UnsupportedContent, match="charset"):
        decode_text(
            codecs.encode(b"x", "zlib") if charset == "zlib" else b"eA==", f"text/plain; charset={charset}"
        )


def test_parse_claims_on_deeply_nested_brackets_drops_the_output_instead_of_a_recursion_error() -> None:
    claims, dropped = parse_claims("[" * 5000 + "]" * 5000)
    assert claims == [] and len(dropped) == 1
