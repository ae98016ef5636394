"""Fixtures the end-to-end modules share. Each module starts its own server (a module-scoped
`server` fixture, with the settings its tests need); these build on it."""

from __future__ import annotations

import pytest

from tests.vace_media import MediaServer


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client with the API key, for the module's server."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def media():
    """A loopback HTTP server the tests put input media on (the server allows private URLs)."""
    srv = MediaServer("127.0.0.1")
    yield srv
    srv.close()
