"""The FastAPI application: lifespan (pool), error handling, routers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypedDict

import asyncpg
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.routing import APIRoute

from fleetline import __version__, db, releases
from fleetline.service import serve_probes
from fleetline.settings import StorageSettings
from fleetline_api import problems
from fleetline_api.devicelistener import DevicePathsOnly
from fleetline_api.limits import RequestLimits
from fleetline_api.provisioning import Provisioner
from fleetline_api.queries import telemetry as sql
from fleetline_api.ratelimit import KeyRateLimiter
from fleetline_api.routes import (
    alarms,
    cas,
    dashboard,
    dead_letters,
    devices,
    endpoints,
    enrollments,
    files,
    firmware,
    health,
    jobs,
    limits,
    message_routes,
    messages,
    methods,
    modules,
    provision,
    query,
    rules,
    stream,
    telemetry,
    transfers,
    twins,
)
from fleetline_api.settings import ApiSettings
from fleetline_api.transfers import TransferDesk
from fleetline_api.workers import refusals
from fleetline_api.workers.broker import BrokerLink
from fleetline_api.workers.c2d import C2dDispatcher
from fleetline_api.workers.jobs import JobRunner
from fleetline_api.workers.stream import StreamHub


class State(TypedDict):
    settings: ApiSettings
    pool: asyncpg.Pool[Any]
    broker: BrokerLink
    provisioner: Provisioner
    transfers: TransferDesk
    stream: StreamHub
    jobs: JobRunner
    rate_limits: KeyRateLimiter
    # How far back each rollup reaches (its retention): older ranges read raw rows.
    rollup_horizons: dict[str, timedelta]
    # Signs firmware releases' manifests (None: no release can be made).
    release_key: ec.EllipticCurvePrivateKey | None


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
            table: await pool.fetchval(sql.INTERVAL, retention)
            for table, retention in (
                ("telemetry_1m", storage.rollup_1m_retention),
                ("telemetry_1h", storage.rollup_1h_retention),
            )
        }
        broker = BrokerLink(settings)
        provisioner = Provisioner(settings, pool, broker)
        broker.provisioner = provisioner
        desk = TransferDesk(settings, pool)
        broker.transfers = desk
        hub = StreamHub(settings, pool)
        runner = JobRunner(settings, broker)
        tasks = [
            asyncio.create_task(broker.run(), name="api.broker"),
            asyncio.create_task(hub.run(), name="api.stream"),
            asyncio.create_task(C2dDispatcher(settings, pool, broker).run(), name="api.c2d"),
            asyncio.create_task(refusals.run(pool), name="api.refusals"),
            asyncio.create_task(desk.run(), name="api.uploads"),
        ]
        # Started last and stopped first: on shutdown its running devices may still
        # finish over the broker link.
        job_task = asyncio.create_task(runner.run(), name="api.jobs")

        async def ready() -> bool:
            return broker.connected and await db.answers(pool)

        probes = None
        try:
            if settings.metrics_port:
                probes = await serve_probes(
                    settings.metrics_host, settings.metrics_port, ready=ready
                )
            yield {
                "settings": settings,
                "pool": pool,
                "broker": broker,
                "provisioner": provisioner,
                "transfers": desk,
                "stream": hub,
                "jobs": runner,
                "rate_limits": KeyRateLimiter(settings.rate_per_key, settings.rate_burst_per_key),
                "rollup_horizons": horizons,
                "release_key": (
                    releases.load_key(settings.release_key_file)
                    if settings.release_key_file
                    else None
                ),
            }
        finally:
            if probes is not None:
                probes.close()
                await probes.wait_closed()
            runner.stop()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(job_task, timeout=30)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await db.close_pool(pool)

    app = FastAPI(
        title="fleetline",
        version=__version__,
        description="REST API of fleetline. Errors are RFC 9457 problem+json.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    problems.install(app)
    if settings.device_port:
        app.add_middleware(DevicePathsOnly, port=settings.device_port)
    # Around every route, before the API key is checked (fleetline_api/limits.py).
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    app.include_router(health.router)
    if not settings.metrics_port:
        app.include_router(health.metrics_router)
    app.include_router(devices.router)
    app.include_router(cas.router)
    app.include_router(firmware.router)
    app.include_router(firmware.key_router)
    app.include_router(endpoints.router)
    app.include_router(enrollments.router)
    app.include_router(provision.router)
    app.include_router(transfers.router)
    app.include_router(limits.router)
    app.include_router(limits.device_router)
    app.include_router(stream.router)
    app.include_router(dead_letters.router)
    app.include_router(dashboard.router)
    app.include_router(telemetry.router)
    app.include_router(telemetry.fleet_router)
    app.include_router(rules.router)
    app.include_router(alarms.router)
    app.include_router(message_routes.router)
    app.include_router(twins.router)
    app.include_router(methods.router)
    app.include_router(modules.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(messages.router)
    app.include_router(query.router)
    return app
