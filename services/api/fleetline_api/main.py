"""``fleetline api``: the REST service.

This first version serves the probes and metrics over the shared database; the REST
resources of PROTOCOL.md are added router by router.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

import asyncpg
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetline import db
from fleetline.logs import setup_logging
from fleetline_api.settings import ApiSettings

log = logging.getLogger(__name__)


class State(TypedDict):
    pool: asyncpg.Pool[Any]


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[State]:
        await db.wait_for_database(settings.dsn)
        pool = await db.create_pool(settings.dsn, min_size=1, max_size=10)
        try:
            yield {"pool": pool}
        finally:
            await db.close_pool(pool)

    app = FastAPI(title="fleetline", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request, response: Response) -> dict[str, str]:
        """The database answers."""
        pool: asyncpg.Pool[Any] = request.state.pool
        try:
            async with pool.acquire(timeout=2) as con:
                await con.fetchval("SELECT 1")
        except Exception:
            response.status_code = 503
            return {"status": "database unreachable"}
        return {"status": "ready"}

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> None:
    settings = ApiSettings()
    setup_logging("api", level=settings.log_level, fmt=settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
