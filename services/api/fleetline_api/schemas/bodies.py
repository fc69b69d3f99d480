"""Request bodies that routes read themselves, with a bound before anything is parsed.

FastAPI reads a declared body model whole, whatever its size; routes whose body is free
JSON (a twin patch, a cloud-to-device message) read the stream here instead: the media
type first (415), then at most ``max_bytes`` (413, from ``Content-Length`` when it is
declared, else while reading).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import HTTPException, Request


async def read_body(
    request: Request, *, max_bytes: int, media_types: Sequence[str], what: str
) -> bytes:
    """The raw body, at most ``max_bytes``, sent as one of ``media_types`` (the first is
    the one named in the 415). ``what`` names the body in the problems ("patch")."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in media_types:
        others = f" (or {', '.join(media_types[1:])})" if len(media_types) > 1 else ""
        raise HTTPException(415, f"send the {what} as {media_types[0]}{others}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"the {what} is {declared} bytes, more than {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, f"the {what} is more than {max_bytes} bytes")
    return bytes(body)


async def read_json_body(
    request: Request, *, max_bytes: int, media_types: Sequence[str], what: str
) -> Any:
    """:func:`read_body`, parsed as JSON (422 when it is not). orjson reads integers
    beyond 64 bits as floats: a route that must keep them exact parses the raw body
    itself (as messages.py does, with pydantic)."""
    raw = await read_body(request, max_bytes=max_bytes, media_types=media_types, what=what)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(422, f"the body is not JSON: {exc}") from None
