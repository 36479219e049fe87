"""A small SMART-on-FHIR test EHR: an OAuth 2 authorization server in front of a real FHIR server.

Test scaffolding, not product. It plays the part of a hospital EHR so chartbrief's SMART launch can
be tested end to end, in a browser or with httpx, against the real local FHIR server:

```
GET  /fhir/.well-known/smart-configuration   discovery (issuer = base_url, S256, capabilities)
GET  /authorize      checks client_id, redirect_uri, PKCE S256, aud == base_url, state, a known
                     `launch` (EHR launch) or the patient chosen with `select_patient` (standalone
                     `launch/patient`); auto-approves and 302s to redirect_uri?code=..&state=..
POST /token          authorization_code (single-use code, PKCE verifier, redirect_uri) and
                     refresh_token (rotated); client auth none / client_secret_basic / private_key_jwt;
                     answers access_token (RS384 JWT), refresh_token, expires_in, scope, patient,
                     encounter, fhirContext, need_patient_banner, id_token (fhirUser)
GET  /jwks           the public key of both JWTs
*    /fhir/{path}    proxy to `fhir_upstream` after checking the bearer token: 401 without a valid
                     one, 403 when a patient-scoped token touches another patient (search
                     parameters, `Patient/{id}` paths, request and response bodies) and, with
                     `enforce_scopes=True`, when no granted v2/v1 scope allows the interaction
```

`TestEhr` runs it with uvicorn on 127.0.0.1 (a port the OS picks) in a background thread for as
long as its `with` block lasts. Token lifetimes are attributes that tests may change at any time
(e.g. a 5 s access token to see a refresh). Everything it was asked is recorded
(`authorize_requests`, `token_requests`, `fhir_requests`) so tests can check what the app sent.

What it must not do: bind anything but the loopback address, keep state beyond the object, or be
imported by product code.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote_plus, urlsplit

import httpx
import uvicorn
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from joserfc import jwk, jwt
from joserfc.errors import JoseError

HOST = "127.0.0.1"
DEFAULT_CLIENT_ID = "chartbrief"
DEFAULT_REDIRECT_URI = "http://127.0.0.1:8000/callback"
DEFAULT_PRACTITIONER = "Practitioner/dr-1"
SIGNING_ALG = "RS384"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ASSERTION_ALGORITHMS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = 300
FHIR_JSON = "application/fhir+json"
# Headers a FHIR client sends that the upstream server must see (Authorization never goes on).
FORWARDED_REQUEST_HEADERS = (
    "accept",
    "content-type",
    "if-match",
    "if-none-exist",
    "if-none-match",
    "if-modified-since",
    "prefer",
)
FORWARDED_RESPONSE_HEADERS = ("content-type", "etag", "last-modified", "location", "content-location")
COMPARTMENT_PARAMS = ("patient", "subject", "beneficiary")
COMPARTMENT_FIELDS = ("subject", "patient", "beneficiary")
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}

JsonObject = dict[str, Any]


# ---------------------------------------------------------------------------
# Pure helpers: references, the patient compartment, scopes
# ---------------------------------------------------------------------------


def patient_id_of(reference: str) -> str | None:
    """The Patient id a reference points at, else None.

    >>> patient_id_of("Patient/p1"), patient_id_of("http://h/fhir/Patient/p1/_history/2")
    ('p1', 'p1')
    >>> patient_id_of("Group/g1") is None, patient_id_of("urn:uuid:1234") is None
    (True, True)
    """
    parts = reference.strip().split("?")[0].split("/")
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "Patient" and parts[index + 1]:
            return parts[index + 1]
    return None


def search_problem(resource_type: str, params: Sequence[tuple[str, str]], patient: str) -> str | None:
    """Why a search's parameters reach outside `patient`'s compartment, or None.

    >>> search_problem("Observation", [("patient", "p1")], "p1") is None
    True
    >>> search_problem("Observation", [("subject", "Patient/p2")], "p1")
    'search parameter subject names another patient'
    >>> search_problem("Patient", [("_id", "p2")], "p1")
    'search parameter _id names another patient'
    """
    for key, value in params:
        name, _, modifier = key.partition(":")
        if resource_type == "Patient" and name == "_id":
            if any(v.strip() != patient for v in value.split(",")):
                return "search parameter _id names another patient"
            continue
        if name not in COMPARTMENT_PARAMS:
            continue
        if modifier and modifier != "Patient":
            return f"search parameter {key} names something other than the patient"
        for item in value.split(","):
            item = item.strip()
            named = patient_id_of(item) if "/" in item else item
            if named != patient:
                return f"search parameter {name} names another patient"
    return None


def path_problem(segments: Sequence[str], patient: str) -> str | None:
    """Why a request path reaches another patient (`Patient/{other}...`), or None.

    >>> path_problem(["Patient", "p2"], "p1")
    'Patient/p2 is another patient'
    >>> path_problem(["Patient", "p1", "_history", "1"], "p1") is None
    True
    """
    if len(segments) >= 2 and segments[0] == "Patient":
        target = segments[1]
        if target != "_search" and not target.startswith("$") and target != patient:
            return f"Patient/{target} is another patient"
    return None


def _reference_values(value: object) -> Iterable[str]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("reference"), str):
            yield item["reference"]


def resource_problem(resource: Mapping[str, Any], patient: str) -> str | None:
    """Why one resource belongs to another patient, or None (resources of no patient pass).

    >>> resource_problem({"resourceType": "Observation", "subject": {"reference": "Patient/p2"}}, "p1")
    'Observation belongs to another patient'
    >>> resource_problem({"resourceType": "Device", "id": "d1"}, "p1") is None
    True
    """
    resource_type = str(resource.get("resourceType") or "resource")
    if resource_type == "Patient":
        rid = resource.get("id")
        return "Patient is another patient" if rid is not None and rid != patient else None
    for name in COMPARTMENT_FIELDS:
        for reference in _reference_values(resource.get(name)):
            named = patient_id_of(reference)
            if named is not None and named != patient:
                return f"{resource_type} belongs to another patient"
    return None


def body_problem(body: object, patient: str) -> str | None:
    """Why a request or response body touches another patient (a resource or any Bundle entry)."""
    if not isinstance(body, dict):
        return None
    if body.get("resourceType") != "Bundle":
        return resource_problem(body, patient)
    for entry in body.get("entry") or []:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") != "OperationOutcome":
            problem = resource_problem(resource, patient)
            if problem:
                return problem
        request = entry.get("request")
        if isinstance(request, dict) and isinstance(request.get("url"), str):
            problem = path_problem(_path_segments(request["url"]), patient)
            if problem:
                return problem
    return None


def _path_segments(url: str) -> list[str]:
    return [s for s in urlsplit(url).path.split("/") if s]


def parse_scope(scope: str) -> tuple[str, str, str] | None:
    """(context, resource type or *, permissions as cruds letters) of a v2 or v1 resource scope.

    >>> parse_scope("patient/Observation.rs"), parse_scope("user/*.read"), parse_scope("openid")
    (('patient', 'Observation', 'rs'), ('user', '*', 'rs'), None)
    """
    context, slash, rest = scope.partition("/")
    if not slash or context not in ("patient", "user", "system"):
        return None
    rest = rest.split("?")[0]
    resource_type, dot, permissions = rest.rpartition(".")
    if not dot or not resource_type:
        return None
    permissions = V1_PERMISSIONS.get(permissions, permissions)
    if not permissions or any(letter not in "cruds" for letter in permissions):
        return None
    return context, resource_type, permissions


def scopes_allow(scopes: Iterable[str], resource_type: str, interaction: str) -> bool:
    """True when some scope grants `interaction` (one of c r u d s) on `resource_type`.

    >>> scopes_allow(["patient/Observation.rs"], "Observation", "s")
    True
    >>> scopes_allow(["patient/DocumentReference.c"], "DocumentReference", "u")
    False
    """
    for scope in scopes:
        parsed = parse_scope(scope)
        if parsed and parsed[1] in ("*", resource_type) and interaction in parsed[2]:
            return True
    return False


def interaction_of(method: str, segments: Sequence[str]) -> tuple[str, str] | None:
    """(resource type, interaction letter) of a FHIR request; None for the whole-system level.

    >>> interaction_of("GET", ["Observation"]), interaction_of("PUT", ["Provenance", "x"])
    (('Observation', 's'), ('Provenance', 'u'))
    """
    if not segments:
        return None
    resource_type = segments[0]
    method = method.upper()
    if method in ("GET", "HEAD"):
        if len(segments) == 1 or segments[1] == "_history":
            return resource_type, "s"
        return resource_type, "r"
    if method == "POST":
        if len(segments) >= 2 and segments[1] == "_search":
            return resource_type, "s"
        if len(segments) >= 2 and segments[-1].startswith("$"):
            return resource_type, "r"
        return resource_type, "c"
    if method in ("PUT", "PATCH"):
        return resource_type, "u"
    if method == "DELETE":
        return resource_type, "d"
    return resource_type, "r"


def scope_problem(scopes: Sequence[str], method: str, segments: Sequence[str], body: object) -> str | None:
    """Why the granted scopes do not allow this request (a transaction is checked entry by entry)."""
    checks: list[tuple[str, str]] = []
    if not segments and method.upper() == "POST" and isinstance(body, dict):
        for entry in body.get("entry") or []:
            request = entry.get("request") if isinstance(entry, dict) else None
            if isinstance(request, dict) and isinstance(request.get("url"), str):
                found = interaction_of(str(request.get("method") or "GET"), _path_segments(request["url"]))
                if found:
                    checks.append(found)
    else:
        found = interaction_of(method, segments)
        if found is None:
            return "whole-system interactions are not granted"
        checks.append(found)
    for resource_type, interaction in checks:
        # A note's attachment is read with the right to read the note.
        note_attachment = resource_type == "Binary" and interaction == "r"
        if note_attachment and scopes_allow(scopes, "DocumentReference", "r"):
            continue
        if not scopes_allow(scopes, resource_type, interaction):
            return f"no granted scope allows {interaction!r} on {resource_type}"
    return None


# ---------------------------------------------------------------------------
# Server state
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchContext:
    """What the EHR knows when it launches the app (or the user picked, in a standalone launch)."""

    patient: str | None
    encounter: str | None = None
    need_patient_banner: bool = True
    practitioner: str = DEFAULT_PRACTITIONER
    fhir_context: tuple[JsonObject, ...] = ()


@dataclass
class _Launch:
    context: LaunchContext
    expires_at: float


@dataclass
class _Grant:
    client_id: str
    scope: tuple[str, ...]
    context: LaunchContext


@dataclass
class _Code:
    grant: _Grant
    redirect_uri: str
    code_challenge: str
    expires_at: float
    used: bool = False
    refresh_tokens: list[str] = field(default_factory=list)


@dataclass
class _Refresh:
    grant: _Grant
    expires_at: float


class OAuthFailure(Exception):
    """An OAuth error answer: status, `error` code and a description."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description

    def response(self) -> JSONResponse:
        headers = {"Cache-Control": "no-store"}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="test-ehr"'
        return JSONResponse(
            {"error": self.error, "error_description": self.description}, self.status, headers=headers
        )


def _outcome(status: int, code: str, text: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return JSONResponse(body, status, headers=dict(headers or {}), media_type=FHIR_JSON)


class TestEhr:
    """A SMART test EHR on 127.0.0.1 in a background thread, proxying FHIR to `fhir_upstream`."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(
        self,
        fhir_upstream: str,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        redirect_uris: Sequence[str] = (DEFAULT_REDIRECT_URI,),
        client_secret: str | None = None,
        client_jwks: Mapping[str, Any] | None = None,
        access_token_lifetime: int = 3600,
        refresh_token_lifetime: int = 24 * 3600,
        code_lifetime: int = 60,
        launch_lifetime: int = 600,
        issue_refresh_tokens: bool = True,
        enforce_scopes: bool = False,
        withheld_scopes: Iterable[str] = (),
        practitioner: str = DEFAULT_PRACTITIONER,
        upstream_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if client_secret is not None and client_jwks is not None:
            raise ValueError("TestEhr: a client is either client_secret_basic or private_key_jwt, not both")
        self.fhir_upstream = fhir_upstream.rstrip("/")
        self.client_id = client_id
        self.redirect_uris = tuple(redirect_uris)
        self.client_secret = client_secret
        self.client_jwks = dict(client_jwks) if client_jwks is not None else None
        self.access_token_lifetime = access_token_lifetime
        self.refresh_token_lifetime = refresh_token_lifetime
        self.code_lifetime = code_lifetime
        self.launch_lifetime = launch_lifetime
        self.issue_refresh_tokens = issue_refresh_tokens
        self.enforce_scopes = enforce_scopes
        self.withheld_scopes = frozenset(withheld_scopes)
        self.practitioner = practitioner
        # Tests of the proxy alone may answer for the upstream in-process (httpx.MockTransport).
        self._upstream_transport = upstream_transport
        # Keys set to None here are removed from the discovery document (to test a bad EHR).
        self.smart_configuration_overrides: dict[str, Any] = {}
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[dict[str, str]] = []
        self.fhir_requests: list[tuple[str, str, int]] = []

        self.signing_key: jwk.RSAKey = jwk.RSAKey.generate_key(2048, auto_kid=True)
        self._lock = threading.Lock()
        self._launches: dict[str, _Launch] = {}
        self._codes: dict[str, _Code] = {}
        self._refresh_tokens: dict[str, _Refresh] = {}
        self._seen_jtis: set[str] = set()
        self._standalone: LaunchContext | None = None
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- addresses -----------------------------------------------------------

    @property
    def origin(self) -> str:
        if self._port is None:
            raise RuntimeError("the test EHR is not running")
        return f"http://{HOST}:{self._port}"

    @property
    def base_url(self) -> str:
        """The FHIR base the EHR launches with (`iss`), and the access tokens' audience."""
        return f"{self.origin}/fhir"

    @property
    def authorize_url(self) -> str:
        return f"{self.origin}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.origin}/jwks"

    @property
    def jwks(self) -> JsonObject:
        """The public JWKS that verifies the access tokens and id_tokens."""
        public = dict(self.signing_key.as_dict(private=False))
        public.update({"alg": SIGNING_ALG, "use": "sig"})
        return {"keys": [public]}

    # -- what a test drives --------------------------------------------------

    def launch(
        self,
        patient_id: str,
        encounter_id: str | None = None,
        need_patient_banner: bool = True,
        practitioner: str = DEFAULT_PRACTITIONER,
        fhir_context: Sequence[JsonObject] = (),
    ) -> str:
        """Register an EHR launch and return its opaque `launch` value."""
        launch_id = secrets.token_urlsafe(16)
        context = LaunchContext(
            patient_id, encounter_id, need_patient_banner, practitioner, tuple(dict(c) for c in fhir_context)
        )
        with self._lock:
            self._launches[launch_id] = _Launch(context, time.time() + self.launch_lifetime)
        return launch_id

    def select_patient(
        self, patient_id: str | None, encounter_id: str | None = None, need_patient_banner: bool = True
    ) -> None:
        """The patient a standalone launch (`launch/patient`) gets, as if the user picked it."""
        with self._lock:
            self._standalone = (
                None
                if patient_id is None
                else LaunchContext(patient_id, encounter_id, need_patient_banner, self.practitioner)
            )

    def issue_token(
        self,
        *,
        patient: str | None = None,
        scope: str = "patient/*.rs",
        expires_in: int = 3600,
        audience: str | None = None,
        subject: str = "api-client",
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed access token as the EHR would issue it (for REST API and proxy tests).

        `audience` defaults to `base_url`; a negative `expires_in` gives an expired token.
        """
        now = int(time.time())
        claims: JsonObject = {
            "iss": self.base_url,
            "sub": subject,
            "aud": audience if audience is not None else self.base_url,
            "iat": now,
            "exp": now + expires_in,
            "jti": secrets.token_hex(8),
            "scope": scope,
            "client_id": self.client_id,
        }
        if patient is not None:
            claims["patient"] = patient
        claims.update(extra_claims or {})
        return self._sign(claims)

    def revoke_refresh_tokens(self) -> None:
        """Forget every refresh token (the next refresh gets invalid_grant)."""
        with self._lock:
            self._refresh_tokens.clear()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> str:
        """Serve on a free loopback port; return `base_url` once it answers."""
        if self._thread is not None:
            return self.base_url
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._build_app(),
            log_level="warning",
            access_log=False,
            lifespan="on",
            loop="asyncio",
            http="h11",
            ws="none",
        )
        self._server = uvicorn.Server(config)
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="test-ehr", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError("the test EHR did not start (see the uvicorn output above)")
            time.sleep(0.02)
        return self.base_url

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=15)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- tokens --------------------------------------------------------------

    def _sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": SIGNING_ALG, "kid": self.signing_key.kid, "typ": "JWT"}
        return jwt.encode(header, dict(claims), self.signing_key, algorithms=[SIGNING_ALG])

    def _access_token(self, grant: _Grant, now: int) -> str:
        return self.issue_token(
            patient=grant.context.patient,
            scope=" ".join(grant.scope),
            expires_in=self.access_token_lifetime,
            subject=grant.context.practitioner.rpartition("/")[2] or grant.client_id,
            extra_claims={"iat": now, "fhirUser": f"{self.base_url}/{grant.context.practitioner}"},
        )

    def _id_token(self, grant: _Grant, now: int) -> str:
        claims: JsonObject = {
            "iss": self.base_url,
            "sub": grant.context.practitioner.rpartition("/")[2],
            "aud": grant.client_id,
            "iat": now,
            "exp": now + 3600,
        }
        if "fhirUser" in grant.scope:
            claims["fhirUser"] = f"{self.base_url}/{grant.context.practitioner}"
        return self._sign(claims)

    def _token_response(self, grant: _Grant) -> JsonObject:
        now = int(time.time())
        body: JsonObject = {
            "access_token": self._access_token(grant, now),
            "token_type": "Bearer",
            "expires_in": self.access_token_lifetime,
            "scope": " ".join(grant.scope),
        }
        context = grant.context
        if context.patient is not None:
            body["patient"] = context.patient
            body["need_patient_banner"] = context.need_patient_banner
        if context.encounter is not None:
            body["encounter"] = context.encounter
        if context.fhir_context:
            body["fhirContext"] = [dict(c) for c in context.fhir_context]
        if "openid" in grant.scope:
            body["id_token"] = self._id_token(grant, now)
        if self.issue_refresh_tokens:
            refresh = secrets.token_urlsafe(32)
            with self._lock:
                self._refresh_tokens[refresh] = _Refresh(grant, now + self.refresh_token_lifetime)
            body["refresh_token"] = refresh
        return body

    def verify_access_token(self, token: str) -> JsonObject:
        """The claims of a valid access token for this FHIR base; raises `JoseError` otherwise."""
        decoded = jwt.decode(token, self.signing_key, algorithms=[SIGNING_ALG])
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": self.base_url},
            aud={"essential": True, "value": self.base_url},
            exp={"essential": True},
        ).validate(decoded.claims)
        return dict(decoded.claims)

    # -- client authentication -------------------------------------------------

    def _authenticate_client(self, form: Mapping[str, str], authorization: str | None) -> str:
        """The client_id of an authenticated client, or an `OAuthFailure` (invalid_client)."""
        if self.client_secret is not None:
            return self._basic_client(authorization)
        if self.client_jwks is not None:
            return self._assertion_client(form)
        client_id = form.get("client_id", "")
        if client_id != self.client_id:
            raise OAuthFailure(401, "invalid_client", "unknown client_id")
        return client_id

    def _basic_client(self, authorization: str | None) -> str:
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise OAuthFailure(401, "invalid_client", "client_secret_basic authentication is required")
        try:
            pair = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthFailure(401, "invalid_client", "malformed Basic credentials") from None
        raw_id, _, raw_secret = pair.partition(":")
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        assert self.client_secret is not None
        id_ok = secrets.compare_digest(client_id.encode(), self.client_id.encode())
        secret_ok = secrets.compare_digest(secret.encode(), self.client_secret.encode())
        if not (id_ok and secret_ok):
            raise OAuthFailure(401, "invalid_client", "wrong client credentials")
        return client_id

    def _assertion_client(self, form: Mapping[str, str]) -> str:
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE or not form.get("client_assertion"):
            raise OAuthFailure(401, "invalid_client", "private_key_jwt authentication is required")
        assert self.client_jwks is not None
        try:
            keys = jwk.KeySet.import_key_set(self.client_jwks)  # type: ignore[arg-type]
            decoded = jwt.decode(form["client_assertion"], keys, algorithms=list(CLIENT_ASSERTION_ALGORITHMS))
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self.client_id},
                sub={"essential": True, "value": self.client_id},
                aud={"essential": True, "value": self.token_url},
                exp={"essential": True},
                jti={"essential": True},
            ).validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            reason = f"client assertion refused ({type(exc).__name__})"
            raise OAuthFailure(401, "invalid_client", reason) from None
        claims = decoded.claims
        if float(claims["exp"]) > time.time() + MAX_ASSERTION_LIFETIME + 5:
            raise OAuthFailure(401, "invalid_client", "client assertion lives longer than 300 s")
        with self._lock:
            if claims["jti"] in self._seen_jtis:
                raise OAuthFailure(401, "invalid_client", "client assertion jti was already used")
            self._seen_jtis.add(str(claims["jti"]))
        return self.client_id

    # -- grants ----------------------------------------------------------------

    def _authorization_code(self, form: Mapping[str, str], client_id: str) -> JsonObject:
        code = form.get("code", "")
        with self._lock:
            record = self._codes.get(code)
            if record is None:
                raise OAuthFailure(400, "invalid_grant", "unknown authorization code")
            if record.used:
                # RFC 6749 4.1.2: a replayed code revokes what the first use issued.
                for token in record.refresh_tokens:
                    self._refresh_tokens.pop(token, None)
                raise OAuthFailure(400, "invalid_grant", "authorization code already used")
            record.used = True
        if record.expires_at < time.time():
            raise OAuthFailure(400, "invalid_grant", "authorization code expired")
        if record.grant.client_id != client_id:
            raise OAuthFailure(400, "invalid_grant", "authorization code was issued to another client")
        if form.get("redirect_uri") != record.redirect_uri:
            raise OAuthFailure(400, "invalid_grant", "redirect_uri does not match the authorize request")
        verifier = form.get("code_verifier")
        if not verifier:
            raise OAuthFailure(400, "invalid_request", "code_verifier is required (PKCE)")
        if not _pkce_matches(verifier, record.code_challenge):
            raise OAuthFailure(400, "invalid_grant", "code_verifier does not match the code_challenge")
        body = self._token_response(record.grant)
        if "refresh_token" in body:
            record.refresh_tokens.append(body["refresh_token"])
        return body

    def _refresh(self, form: Mapping[str, str], client_id: str) -> JsonObject:
        token = form.get("refresh_token", "")
        with self._lock:
            record = self._refresh_tokens.pop(token, None)  # rotation: single use
        if record is None or record.expires_at < time.time():
            raise OAuthFailure(400, "invalid_grant", "unknown or expired refresh token")
        if record.grant.client_id != client_id:
            raise OAuthFailure(400, "invalid_grant", "refresh token was issued to another client")
        grant = record.grant
        narrowed = form.get("scope")
        if narrowed:
            wanted = tuple(narrowed.split())
            if not set(wanted) <= set(grant.scope):
                raise OAuthFailure(400, "invalid_scope", "a refresh cannot widen the granted scope")
            grant = _Grant(grant.client_id, wanted, grant.context)
        return self._token_response(grant)

    # -- the authorize decision (pure apart from the state it reads) ----------

    def _authorize(self, params: Mapping[str, str]) -> str:
        """The code for an approved request, or an `OAuthFailure` to send back to the redirect_uri."""
        if params.get("response_type") != "code":
            raise OAuthFailure(400, "unsupported_response_type", "response_type must be code")
        if not params.get("state"):
            raise OAuthFailure(400, "invalid_request", "state is required")
        if not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
            raise OAuthFailure(400, "invalid_request", "PKCE with code_challenge_method=S256 is required")
        if (params.get("aud") or "").rstrip("/") != self.base_url:
            raise OAuthFailure(400, "invalid_request", "aud is not this EHR's FHIR base URL")
        requested = tuple(dict.fromkeys((params.get("scope") or "").split()))
        if not requested:
            raise OAuthFailure(400, "invalid_scope", "scope is required")
        context = self._launch_context(requested, params.get("launch"))
        granted = tuple(s for s in requested if s not in self.withheld_scopes)
        code = secrets.token_urlsafe(32)
        grant = _Grant(params["client_id"], granted, context)
        with self._lock:
            self._codes[code] = _Code(
                grant, params["redirect_uri"], params["code_challenge"], time.time() + self.code_lifetime
            )
        return code

    def _launch_context(self, scopes: Sequence[str], launch: str | None) -> LaunchContext:
        if "launch" in scopes:
            if not launch:
                raise OAuthFailure(400, "invalid_request", "the launch scope needs a launch parameter")
            with self._lock:
                record = self._launches.get(launch)
            if record is None or record.expires_at < time.time():
                raise OAuthFailure(400, "invalid_request", "unknown or expired launch")
            return record.context
        if launch:
            raise OAuthFailure(400, "invalid_scope", "a launch parameter needs the launch scope")
        if "launch/patient" in scopes:
            with self._lock:
                chosen = self._standalone
            if chosen is None:
                raise OAuthFailure(400, "access_denied", "no patient was selected")
            return chosen
        return LaunchContext(patient=None, practitioner=self.practitioner)

    def smart_configuration(self) -> JsonObject:
        config: JsonObject = {
            "issuer": self.base_url,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGORITHMS),
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "response_types_supported": ["code"],
            "scopes_supported": [
                "openid",
                "fhirUser",
                "launch",
                "launch/patient",
                "offline_access",
                "online_access",
                "patient/*.cruds",
                "user/*.cruds",
            ],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": [
                "launch-ehr",
                "launch-standalone",
                "client-public",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "context-banner",
                "context-ehr-patient",
                "context-ehr-encounter",
                "context-standalone-patient",
                "sso-openid-connect",
                "permission-patient",
                "permission-user",
                "permission-v1",
                "permission-v2",
            ],
        }
        for key, value in self.smart_configuration_overrides.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        return config

    # -- the FHIR proxy -------------------------------------------------------

    def _fhir_refusal(self, request: Request, segments: list[str], body: object) -> Response | None:
        authorization = request.headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _outcome(401, "login", "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            claims = self.verify_access_token(token.strip())
        except (JoseError, ValueError) as exc:
            return _outcome(
                401,
                "login",
                f"the access token is not valid here ({type(exc).__name__})",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        scopes = str(claims.get("scope") or "").split()
        if self.enforce_scopes:
            problem = scope_problem(scopes, request.method, segments, body)
            if problem:
                return _outcome(403, "forbidden", problem)
        if not any(s.startswith("patient/") for s in scopes):
            return None
        patient = claims.get("patient")
        if not isinstance(patient, str) or not patient:
            return _outcome(403, "forbidden", "patient-level scopes without a patient in context")
        resource_type = segments[0] if segments else ""
        problem = (
            path_problem(segments, patient)
            or search_problem(resource_type, list(request.query_params.multi_items()), patient)
            or body_problem(body, patient)
        )
        if problem:
            return _outcome(403, "forbidden", f"the token is limited to its launch patient: {problem}")
        request.state.patient = patient
        return None

    async def _proxy(self, request: Request, path: str) -> Response:
        segments = [s for s in path.split("/") if s]
        raw_body = await request.body()
        body: object = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except (ValueError, UnicodeDecodeError):
                return _outcome(400, "invalid", "the request body is not JSON")
        if segments != ["metadata"]:
            refusal = self._fhir_refusal(request, segments, body)
            if refusal is not None:
                self.fhir_requests.append((request.method, "/" + "/".join(segments), refusal.status_code))
                return refusal
        upstream_body = raw_body.replace(self.base_url.encode(), self.fhir_upstream.encode())
        url = f"{self.fhir_upstream}/{'/'.join(segments)}" if segments else self.fhir_upstream
        query = request.url.query
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        http: httpx.AsyncClient = request.app.state.http
        upstream = await http.request(
            request.method, f"{url}?{query}" if query else url, content=upstream_body or None, headers=headers
        )
        content = upstream.content.replace(self.fhir_upstream.encode(), self.base_url.encode())
        patient = getattr(request.state, "patient", None)
        if patient is not None and upstream.is_success and content:
            try:
                answer = json.loads(content)
            except (ValueError, UnicodeDecodeError):
                answer = None
            problem = body_problem(answer, patient)
            if problem:
                self.fhir_requests.append((request.method, "/" + "/".join(segments), 403))
                return _outcome(403, "forbidden", f"the token is limited to its launch patient: {problem}")
        out_headers = {
            k: v.replace(self.fhir_upstream, self.base_url)
            for k, v in upstream.headers.items()
            if k.lower() in FORWARDED_RESPONSE_HEADERS
        }
        self.fhir_requests.append((request.method, "/" + "/".join(segments), upstream.status_code))
        return Response(content, upstream.status_code, headers=out_headers)

    # -- the app ----------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            timeout = httpx.Timeout(300.0)
            async with httpx.AsyncClient(timeout=timeout, transport=self._upstream_transport) as http:
                app.state.http = http
                yield

        app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

        @app.get("/fhir/.well-known/smart-configuration")
        async def smart_configuration() -> JSONResponse:
            return JSONResponse(self.smart_configuration())

        @app.get("/jwks")
        async def jwks() -> JSONResponse:
            return JSONResponse(self.jwks)

        @app.get("/authorize", response_model=None)
        async def authorize(request: Request) -> Response:
            params = dict(request.query_params)
            self.authorize_requests.append(params)
            if params.get("client_id") != self.client_id:
                return PlainTextResponse("unknown client_id", 400)
            redirect_uri = params.get("redirect_uri", "")
            if redirect_uri not in self.redirect_uris:
                # Never redirect to an unregistered address: the code would leak there.
                return PlainTextResponse("redirect_uri is not registered for this client", 400)
            target = httpx.URL(redirect_uri)
            try:
                code = self._authorize(params)
            except OAuthFailure as failure:
                answer = {"error": failure.error, "error_description": failure.description}
                if params.get("state"):
                    answer["state"] = params["state"]
                return RedirectResponse(str(target.copy_merge_params(answer)), 302)
            approved = target.copy_merge_params({"code": code, "state": params["state"]})
            return RedirectResponse(str(approved), 302)

        @app.post("/token", response_model=None)
        async def token(request: Request) -> Response:
            form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
            grant_type = form.get("grant_type", "")
            record = {"grant_type": grant_type, "client_auth": _auth_kind(form, request.headers)}
            self.token_requests.append(record)
            try:
                client_id = self._authenticate_client(form, request.headers.get("authorization"))
                if grant_type == "authorization_code":
                    body = self._authorization_code(form, client_id)
                elif grant_type == "refresh_token":
                    body = self._refresh(form, client_id)
                else:
                    reason = f"grant_type {grant_type!r} is not supported"
                    raise OAuthFailure(400, "unsupported_grant_type", reason)
            except OAuthFailure as failure:
                record["outcome"] = failure.error
                return failure.response()
            record["outcome"] = "ok"
            return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]

        @app.api_route("/fhir", methods=methods, response_model=None)
        async def fhir_base(request: Request) -> Response:
            return await self._proxy(request, "")

        @app.api_route("/fhir/{path:path}", methods=methods, response_model=None)
        async def fhir(request: Request, path: str) -> Response:
            return await self._proxy(request, path)

        return app


def _pkce_matches(verifier: str, challenge: str) -> bool:
    try:
        expected = str(create_s256_code_challenge(verifier))
    except UnicodeEncodeError:
        return False
    return secrets.compare_digest(expected.encode(), challenge.encode())


def _auth_kind(form: Mapping[str, str], headers: Mapping[str, str]) -> str:
    if form.get("client_assertion"):
        return "private_key_jwt"
    if headers.get("authorization", "").lower().startswith("basic "):
        return "client_secret_basic"
    return "none"
