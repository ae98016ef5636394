"""Bearer-key authentication. Keys are compared in constant time.

`require_key` is the FastAPI dependency, set once on each keyed router
(`APIRouter(dependencies=[Depends(require_key)])`), so no route can forget it. Routes that are
public by design live on routers without it: health, `/media/` (its URLs carry an unguessable
token; players and browsers send no bearer header), the signed upload `PUT` URL (the signature
is the authorisation), the API docs, and any playground assets to come.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.kernel.errors import ApiError
from server.state import state_of

# Declares the bearer scheme in the OpenAPI document, on every route that depends on it. It
# refuses nothing itself (auto_error=False): the messages are `Authenticator.check`'s.
_bearer = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="An API key: `Authorization: Bearer <key>`"
)


class Authenticator:
    def __init__(self, keys: list[str]):
        # Open mode is an explicit setting (keys == []), never the result of a missing config:
        # Settings.effective_api_keys generates a key when none is configured.
        self._keys = [k.encode() for k in keys]

    @property
    def open(self) -> bool:
        return not self._keys

    def check(self, request: Request) -> None:
        if self.open:
            return
        header = request.headers.get("authorization", "").strip()
        scheme, _, token = header.partition(" ")
        if header and scheme.lower() != "bearer":
            # The usual slip: the key sent alone. Say so rather than "missing".
            raise ApiError(
                401, "The Authorization header needs the 'Bearer' scheme: send 'Authorization: Bearer <key>'"
            )
        if not token.strip():
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        # Check every key (no early exit) so timing says nothing about which one nearly matched.
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise ApiError(401, "Invalid API key")


async def require_key(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    # async: a constant-time compare needs no thread of its own.
    state_of(request).auth.check(request)
