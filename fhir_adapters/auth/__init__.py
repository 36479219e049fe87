"""Authorization against the EHR: where the FHIR client gets its bearer token from.

`TokenProvider` is the seam: a static token from settings here, an EHR-launch session in
`launch` (`RefreshingToken`) and SMART Backend Services in `backend`. The client asks for a
token before each request and calls `invalidate()` once when the server answers 401, then asks
again. `oauth` holds the OAuth both share (discovery, token requests, client assertions, keys,
id_token checks); `scopes` derives every scope list from one declaration of what chartbrief
reads and writes.

A token is a secret: nothing here logs it or shows it in `repr()` / `str()`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class TokenProvider(Protocol):
    """Supplies the current access token for `Authorization: Bearer`."""

    async def token(self) -> str:
        """The token to send now (fetching or refreshing it first if needed)."""
        ...

    async def invalidate(self) -> None:
        """Forget the current token: the server refused it, the next `token()` must get a new one."""
        ...


class StaticToken:
    """A fixed token from configuration. It cannot be renewed, so `invalidate()` does nothing."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not token or not token.strip():
            raise ValueError("bearer token is empty (CHARTBRIEF_FHIR__BEARER_TOKEN)")
        self._token = token.strip()

    async def token(self) -> str:
        return self._token

    async def invalidate(self) -> None:
        # Nothing to renew: the retry after a 401 resends the same token and the
        # second 401 surfaces as FhirAuthError.
        return None

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"

    __str__ = __repr__
