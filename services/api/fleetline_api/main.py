"""``fleetline api``: the REST service."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from fleetline.logs import setup_logging
from fleetline.settings import load
from fleetline_api import devicelistener
from fleetline_api.app import create_app
from fleetline_api.server import ProblemH11Protocol
from fleetline_api.settings import ApiSettings
from fleetline_api.transfers import TRANSFERS_PATH


class _HideGrants(logging.Filter):
    """The access log's requests of transfer URLs without their grant: for a device
    logging in with a certificate the URL is its credential while it lasts."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str):
            path = args[2]
            if path.startswith(TRANSFERS_PATH + "/"):
                record.args = (*args[:2], TRANSFERS_PATH + "/<grant>", *args[3:])
        return True


def main() -> None:
    settings = load(ApiSettings)
    setup_logging("api", level=settings.log_level, fmt=settings.log_format)
    logging.getLogger("uvicorn.access").addFilter(_HideGrants())
    options: dict[str, Any] = {
        "log_config": None,
        "timeout_graceful_shutdown": 10,
        "http": ProblemH11Protocol,
        # A header block still arriving past 4x the limit is cut off (400); one that
        # arrived whole is measured by RequestLimits (431 over the limit).
        "h11_max_incomplete_event_size": 4 * settings.max_header_bytes,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **options)
    server = uvicorn.Server(config)
    if not settings.device_port:
        server.run()
        return
    asyncio.run(devicelistener.serve(app, server, settings, **options))
