"""The FastAPI application: lifespan (pool), error handling, routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypedDict

import asyncpg
from fastapi import FastAPI
from fastapi.routing import APIRoute

from fleetline import __version__, db
from fleetline.settings import StorageSettings
from fleetline_api import problems
from fleetline_api.routes import devices, health, telemetry
from fleetline_api.settings import ApiSettings


class State(TypedDict):
    pool: asyncpg.Pool[Any]
    # How far back each rollup reaches (its retention): older ranges read raw rows.
    rollup_horizons: dict[str, timedelta]


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[State]:
        await db.wait_for_database(settings.dsn)
        pool = await db.create_pool(
            settings.dsn, min_size=1, max_size=settings.pool_size, command_timeout=30
        )
        storage = StorageSettings()
        horizons = {
            table: await pool.fetchval("SELECT $1::text::interval", retention)
            for table, retention in (
                ("telemetry_1m", storage.rollup_1m_retention),
                ("telemetry_1h", storage.rollup_1h_retention),
            )
        }
        try:
            yield {"pool": pool, "rollup_horizons": horizons}
        finally:
            await db.close_pool(pool)

    app = FastAPI(
        title="fleetline",
        version=__version__,
        description="REST API of fleetline. Errors are RFC 9457 problem+json.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    problems.install(app)
    app.include_router(health.router)
    app.include_router(devices.router)
    app.include_router(telemetry.router)
    app.include_router(telemetry.fleet_router)
    return app
