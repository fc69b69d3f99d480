"""The devices' HTTPS listener (``FLEETLINE_API_DEVICE_PORT``, docs/ota.md).

The same application as the API's port, in the same process, served with TLS on a port
of its own; on it only what devices use answers (transfers, provisioning, the health
probes); anything else is 404 there. It starts once the API's port has started (its
lifespan opened the pools) and stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetline_api.limits import send_problem
from fleetline_api.settings import ApiSettings

DEVICE_PATHS = ("/v1/transfers/", "/v1/provision", "/healthz", "/readyz")


class DevicePathsOnly:
    """On the devices' port, only DEVICE_PATHS; elsewhere, everything."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        self.app = app
        self.port = port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if (
            scope["type"] in ("http", "websocket")
            and server is not None
            and server[1] == self.port
            and not scope["path"].startswith(DEVICE_PATHS)
        ):
            if scope["type"] == "websocket":  # refused before it is accepted: 403
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_problem(send, 404, "not served on the devices' listener", scope["path"])
            return
        await self.app(scope, receive, send)


class _DeviceServer(uvicorn.Server):
    """Signals are the API port's server's: this one stops when it does. Its requests
    see the state the API port's lifespan made (the pools...)."""

    def __init__(self, config: uvicorn.Config, main: uvicorn.Server) -> None:
        super().__init__(config)
        self.main = main

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.lifespan.state = self.main.lifespan.state
        await super().startup(sockets)


async def serve(app: Any, main: uvicorn.Server, settings: ApiSettings, **options: Any) -> None:
    """Serve ``app`` on the API's port (``main``) and, with TLS, on the devices' port."""
    device = _DeviceServer(
        uvicorn.Config(
            app,
            host=settings.device_host,
            port=settings.device_port,
            ssl_certfile=settings.device_tls_cert_file,
            ssl_keyfile=settings.device_tls_key_file,
            lifespan="off",
            **options,
        ),
        main,
    )

    async def after_main_started() -> None:
        while not main.started:
            if main.should_exit:
                return
            await asyncio.sleep(0.05)
        await device.serve()

    task = asyncio.create_task(after_main_started(), name="api.device-listener")
    try:
        await main.serve()
    finally:
        device.should_exit = True
        await task
