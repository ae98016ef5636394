"""Reading a request body with a size cap, for the routes that read theirs by hand (submit,
history, the signed upload PUT): past the cap the answer is the caller's 413, and no more than
the cap is ever held in memory."""

from __future__ import annotations

from fastapi import Request

from server.kernel.errors import ApiError


async def read_capped(request: Request, cap: int, too_large: ApiError) -> bytes:
    """The body, or `too_large` raised as soon as the declared or received size passes `cap`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise too_large
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
