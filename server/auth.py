"""Bearer-key authentication. Keys are compared in constant time; the output media and health
need no key (media URLs carry an unguessable token)."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.kernel.errors import ApiError


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
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        # Check every key (no early exit) so timing says nothing about which one nearly matched.
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise ApiError(401, "Invalid API key")
