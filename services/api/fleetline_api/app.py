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
from fastapi_offline import FastAPIOffline

from fleetline import __version__, db, releases
from fleetline.service import serve_probes
from fleetline.settings import StorageSettings
from fleetline_api import asyncapi, problems
from fleetline_api.devicelistener import DevicePathsOnly
from fleetline_api.limits import RequestLimits
from fleetline_api.metrics import RequestMetrics
from fleetline_api.provisioning import Provisioner
from fleetline_api.queries import telemetry as sql
from fleetline_api.ratelimit import KeyRateLimiter
from fleetline_api.routes import (
    alarms,
    apikeys,
    cas,
    dashboard,
    dead_letters,
    devices,
    endpoints,
    enrollments,
    files,
    firmware,
    fleet,
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

# Where Swagger UI's and ReDoc's assets are served.
DOCS_ASSETS = "/docs/assets"


class State(TypedDict):
    settings: ApiSettings
    pool: asyncpg.Pool[Any]
    broker: BrokerLink
    provisioner: Provisioner
    transfers: TransferDesk
    stream: StreamHub
    jobs: JobRunner
    rate_limits: KeyRateLimiter
    # How far back each table reaches (its retention): raw readings ("telemetry") and the
    # rollups (older ranges of a rollup read raw rows).
    retention: dict[str, timedelta]
    # Signs firmware releases' manifests (None: no release can be made).
    release_key: ec.EllipticCurvePrivateKey | None


DESCRIPTION = f"""\
REST API of fleetline, an IoT fleet backend: the device registry and its credentials,
telemetry, twins, direct methods, cloud-to-device messages, jobs, firmware rollouts,
rules and alarms.

- **Authentication**: `Authorization: Bearer <API key>` (`flk_<id>_<secret>`). Each
  route needs a scope (`devices:read`, `devices:write`, `telemetry:read`,
  `commands:write`, `rules:write`, `firmware:write`), which `admin` includes. Admin keys
  make keys with `POST /v1/apikeys`; the first one with the bootstrap token
  (`FLEETLINE_API_BOOTSTRAP_TOKEN`) or `fleetline apikey create`.
- **Errors** are RFC 9457 `application/problem+json`: `title`, `status`, `detail`; 422
  adds `errors`, a bad device query its `position`. Every key is rate limited (429 with
  `Retry-After`); request bodies and headers are size-limited (413, 431) before the key
  is checked.
- **Paging**: lists answer `{{"items": [...], "next_cursor": ...}}`; pass `next_cursor` as
  `cursor` for the next page.
- **Live stream**: `/v1/stream` is a WebSocket, which OpenAPI cannot describe: its query
  parameters, messages and close codes are in the AsyncAPI document at
  [{asyncapi.PATH}]({asyncapi.PATH}).
"""

# The tags in the order the docs show them, each with what its operations are about.
TAGS: list[dict[str, Any]] = [
    {
        "name": "devices",
        "description": "The device registry: devices, their tags, how they "
        "log in (keys, SAS tokens, X.509), gateways and their children.",
    },
    {
        "name": "twins",
        "description": "Device twins: desired and reported properties, "
        "versions (`If-Match`), the desired patch published to the device retained.",
    },
    {
        "name": "methods",
        "description": "Direct methods: call a method on an online device and wait for its answer.",
    },
    {
        "name": "messages",
        "description": "Cloud-to-device messages: a queue per device, "
        "delivered when it is online, acknowledged, expired or cancelled.",
    },
    {"name": "modules", "description": "A device's modules, each with its own twin and methods."},
    {
        "name": "telemetry",
        "description": "Stored readings: raw points, buckets with "
        "aggregates, the latest value of each metric, a fleet's latest values.",
    },
    {"name": "query", "description": "Devices a query over their tags, twins and status matches."},
    {
        "name": "jobs",
        "description": "A method or a twin patch run on every device a query "
        "matches, at a set pace, with each device's outcome.",
    },
    {
        "name": "rules",
        "description": "Rules evaluated on the live readings: thresholds, "
        "ranges, no-data; their actions; backtests on stored readings.",
    },
    {
        "name": "alarms",
        "description": "Alarms raised by rules: acknowledge, clear, their "
        "history and notifications.",
    },
    {
        "name": "routes",
        "description": "Message routes: readings forwarded to a webhook or "
        "an MQTT topic, with their deliveries.",
    },
    {
        "name": "firmware",
        "description": "Signed firmware releases and their images, and "
        "rollouts of them to devices.",
    },
    {"name": "files", "description": "Files uploaded by devices."},
    {
        "name": "transfers",
        "description": "The URLs devices download firmware and upload "
        "files with (a signed grant in the URL, no API key).",
    },
    {
        "name": "enrollments",
        "description": "Enrollments: devices that register themselves "
        "with a shared credential, and their registrations.",
    },
    {
        "name": "provisioning",
        "description": "A device registering itself with an enrollment's SAS token.",
    },
    {
        "name": "certificate authorities",
        "description": "X.509 CAs that sign device certificates, and their proof of possession.",
    },
    {
        "name": "limits",
        "description": "Per-device message and byte rates the broker "
        "enforces, and each device's refused publishes.",
    },
    {"name": "dead-letters", "description": "Messages ingest could not store, with the reason."},
    {
        "name": "stream",
        "description": "The live WebSocket `/v1/stream` (not an OpenAPI operation): its "
        "parameters, messages and close codes are in "
        f"[its AsyncAPI document]({asyncapi.PATH}).",
    },
    {
        "name": "apikeys",
        "description": "API keys: made, listed and revoked by admin keys; "
        "the first one with the bootstrap token. A key's token is shown once.",
    },
    {"name": "health", "description": "Liveness and readiness probes."},
]


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
                ("telemetry", storage.raw_retention),
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
                "retention": horizons,
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

    # Swagger UI (/docs) and ReDoc (/redoc) with their scripts, styles and icon served by
    # the API from the fastapi-offline package (no CDN: they work without internet).
    app = FastAPIOffline(
        title="fleetline",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        static_url=DOCS_ASSETS,
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
    # Outermost: every request counted and timed, those refused by the limits too.
    app.add_middleware(RequestMetrics)
    app.include_router(health.router)
    if not settings.metrics_port:
        app.include_router(health.metrics_router)
    app.include_router(devices.router)
    app.include_router(fleet.router)
    app.include_router(apikeys.router)
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
