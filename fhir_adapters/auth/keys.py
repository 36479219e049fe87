"""A SMART client's signing key and its private_key_jwt assertions (RS384 or ES384).

Part of `fhir_adapters.auth.oauth`'s interface (re-exported there). joserfc holds the keys and
authlib signs the assertion; nothing here is hand-rolled cryptography.

What this module must not do: put key material in a message, a log line or a `repr()`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from authlib.oauth2.rfc7523 import private_key_jwt_sign  # type: ignore[import-untyped]  # no type information
from joserfc import jwk
from joserfc.errors import JoseError

JsonObject = dict[str, Any]
AssertionAlg = Literal["RS384", "ES384"]

# A client assertion lives well under the 300 s SMART allows, so a server with a little clock
# skew still accepts it.
CLIENT_ASSERTION_LIFETIME_SECONDS = 240


def private_key(private_key_pem: str | bytes, alg: str) -> jwk.RSAKey | jwk.ECKey:
    """The private signing key in a PEM (RSA for RS384, EC for ES384); ValueError naming the problem."""
    key_type: Literal["EC", "RSA"] = "EC" if alg.startswith("ES") else "RSA"
    try:
        key: jwk.RSAKey | jwk.ECKey = jwk.import_key(private_key_pem, key_type)
    except (JoseError, ValueError, TypeError) as exc:
        # The message names the problem, never the key material.
        raise ValueError(f"the client private key is not a {alg} key in PEM form ({key_type})") from exc
    if not key.is_private:
        raise ValueError("the client key PEM holds a public key; private_key_jwt needs the private key")
    return key


def generate_key(alg: AssertionAlg = "RS384", kid: str | None = None) -> tuple[bytes, JsonObject]:
    """A new private key (PKCS#8 PEM) and its public JWK (with `kid`, `alg`, `use=sig`)."""
    key: jwk.RSAKey | jwk.ECKey = (
        jwk.RSAKey.generate_key(2048, private=True)
        if alg == "RS384"
        else jwk.ECKey.generate_key("P-384", private=True)
    )
    pem = key.as_pem(private=True)
    return pem, public_jwk(pem, alg, kid)


def public_jwk(private_key_pem: str | bytes, alg: str, kid: str | None = None) -> JsonObject:
    """The public half of a signing key as the JWK registered with the EHR (`kid` = thumbprint by default)."""
    key = private_key(private_key_pem, alg)
    public = dict(key.as_dict(private=False))
    public.update({"kid": kid or key.thumbprint(), "alg": alg, "use": "sig", "key_ops": ["verify"]})
    return public


def sign_assertion(
    client_id: str,
    token_endpoint: str,
    private_key_pem: str | bytes,
    *,
    alg: str,
    kid: str | None,
    now: float,
) -> str:
    """A signed private_key_jwt assertion: iss = sub = client_id, aud = token endpoint, unique jti.

    `now` is the wall clock: the assertion is judged by the server's clock.
    """
    key = private_key(private_key_pem, alg)
    issued = int(now)
    # authlib sets iss, sub, aud and a random jti; the key is a joserfc key, which it signs with as is.
    assertion = private_key_jwt_sign(
        key,
        client_id=client_id,
        token_endpoint=token_endpoint,
        alg=alg,
        header={"kid": kid or key.thumbprint(), "typ": "JWT"},
        issued_at=issued,
        expires_at=issued + CLIENT_ASSERTION_LIFETIME_SECONDS,
    )
    return cast(str, assertion)
