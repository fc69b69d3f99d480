"""Limits applied to every request before any route runs (before the API key is checked):
the headers' and the body's size, and headers that every response carries.

Headers over ``FLEETLINE_API_MAX_HEADER_BYTES`` (names and values, all together) are
refused with 431 problem+json. (The server itself, fleetline_api/server.py, cuts off a
header block still arriving at four times that size, with 400.)

A body larger than ``FLEETLINE_API_MAX_BODY_BYTES`` is refused with 413 problem+json:
at once from its ``Content-Length``, or, for a body sent without one (chunked), once that
many bytes have arrived; nothing beyond the limit is read or kept, so memory per request
is bounded whoever sends it. A body without a length is read into memory (up to the
limit) before the route runs, so the route sees it whole, as with a length.

Every HTTP response gets ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetline_api.problems import MEDIA_TYPE, problem_body

NOSNIFF = (b"x-content-type-options", b"nosniff")


async def send_problem(send: Send, status: int, detail: str, path: str) -> None:
    """A problem+json response, written straight to the ASGI server."""
    body = problem_body(status, detail, path)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                NOSNIFF,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware around the whole application (see the module)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", []))
        if header_bytes > self.max_header_bytes:
            detail = f"the request headers are over {self.max_header_bytes:,} bytes"
            await send_problem(send, 431, detail, path)
            return
        too_large = f"the request body is over {self.max_body_bytes:,} bytes"
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await send_problem(send, 400, "Content-Length is not a number", path)
                return
            if int(length) > self.max_body_bytes:
                await send_problem(send, 413, too_large, path)
                return
        elif _header(scope, b"transfer-encoding") is not None:
            # No length: take the body in, up to the limit, before the route sees it.
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await send_problem(send, 413, too_large, path)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            receive = _replay(b"".join(chunks), receive)

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), NOSNIFF]
            await send(message)

        await self.app(scope, receive, send_nosniff)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands ``body`` over once, then waits on the real one (for the
    client's disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: dict[str, Any] = dict(await receive())
        return message

    return replay
