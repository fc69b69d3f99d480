"""Running a service process: signals, logging, the small HTTP endpoint for probes."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[bool]]


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main``; SIGTERM and SIGINT cancel it so its ``finally`` blocks flush and close."""

    async def runner() -> None:
        me = asyncio.current_task()
        assert me is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, me.cancel)
        try:
            await main
        except asyncio.CancelledError:
            log.info("shutdown complete")

    asyncio.run(runner())


async def serve_probes(host: str, port: int, *, ready: HealthCheck) -> asyncio.Server:
    """``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (``ready()`` holds).

    A tiny HTTP/1.0 responder: enough for probes and scrapes without a web framework in
    services that do not otherwise serve HTTP.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].split(b"?")[0] if b" " in request else b""
            if path == b"/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest()
            elif path == b"/healthz":
                status, ctype, body = 200, "text/plain", b"ok\n"
            elif path == b"/readyz":
                ok = await ready()
                status, ctype = (200 if ok else 503), "text/plain"
                body = b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("serving /metrics, /healthz and /readyz on http://%s:%d", host, port)
    return server
