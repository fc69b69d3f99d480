"""Dependencies shared by the routers: the pool, the settings, the broker link, API-key
authentication with scopes, and the registered-device checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetline import apikeys, db
from fleetline.apikeys import KeyInfo, Scope
from fleetline_api.queries import devices as sql
from fleetline_api.ratelimit import KeyRateLimiter
from fleetline_api.settings import ApiSettings
from fleetline_api.waits import AUTH_TIMEOUT_SECONDS, within
from fleetline_api.workers.broker import BrokerLink

if TYPE_CHECKING:
    Pool = asyncpg.Pool[Any]
else:  # FastAPI resolves annotations at run time, where Pool is not subscriptable
    Pool = asyncpg.Pool


async def get_pool(request: Request) -> Pool:
    pool: Pool = request.state.pool
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]


async def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.state.settings
    return settings


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
_bearer = HTTPBearer(auto_error=False, description="An API key: flk_<id>_<secret>")
# The bearer credentials of a request, if any (for routes that check them themselves).
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def _verify(pool: Pool, token: str) -> KeyInfo | None:
    # Waiting for a connection is bounded too: no backlog of key checks builds up behind
    # a stalled database.
    async with pool.acquire(timeout=AUTH_TIMEOUT_SECONDS) as con:
        return await apikeys.verify(con, token)


async def authorize(pool: Pool, token: str | None, *scopes: Scope) -> KeyInfo:
    """The key behind ``token`` if it holds one of ``scopes`` (or ``admin``);
    HTTPException 401 (no or unknown key) or 403 (scope missing) otherwise."""
    if token is None:
        raise HTTPException(
            401, "an API key is required: Authorization: Bearer <key>", headers=_CHALLENGE
        )
    key = await within(AUTH_TIMEOUT_SECONDS, _verify(pool, token))
    if key is None:
        raise HTTPException(401, "unknown or revoked API key", headers=_CHALLENGE)
    if "admin" not in key.scopes and not set(scopes) & set(key.scopes):
        raise HTTPException(403, f"this key lacks the {' or '.join(scopes)} scope")
    return key


def require(*scopes: Scope) -> Callable[..., Awaitable[KeyInfo]]:
    """A dependency that lets through keys holding one of ``scopes`` (or ``admin``)."""

    async def check(request: Request, pool: PoolDep, credentials: Bearer) -> KeyInfo:
        key = await authorize(pool, credentials.credentials if credentials else None, *scopes)
        take_rate(request, key.id)
        return key

    return check


def take_rate(request: Request, bucket: str) -> None:
    """One request of ``bucket`` (a key's id) from the rate limit per key; 429 with
    Retry-After when it has none left."""
    limiter: KeyRateLimiter = request.state.rate_limits
    wait = limiter.take(bucket)
    if wait is not None:
        raise HTTPException(
            429,
            f"this key made more than its {limiter.rate:g} requests a second "
            f"(bursts of {limiter.burst:g}); try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )


DevicesRead = Annotated[KeyInfo, Depends(require("devices:read"))]
DevicesWrite = Annotated[KeyInfo, Depends(require("devices:write"))]
TelemetryRead = Annotated[KeyInfo, Depends(require("telemetry:read"))]
CommandsWrite = Annotated[KeyInfo, Depends(require("commands:write"))]
RulesRead = Annotated[KeyInfo, Depends(require("rules:write", "telemetry:read"))]
RulesWrite = Annotated[KeyInfo, Depends(require("rules:write"))]
FirmwareRead = Annotated[KeyInfo, Depends(require("firmware:write", "devices:read"))]
FirmwareWrite = Annotated[KeyInfo, Depends(require("firmware:write"))]
Admin = Annotated[KeyInfo, Depends(require("admin"))]


def actor(key: KeyInfo) -> str:
    """How a change made with ``key`` is recorded (alarm history, messages, jobs)."""
    return f"{key.name} (key {key.id})"


async def get_broker(request: Request) -> BrokerLink:
    broker: BrokerLink = request.state.broker
    return broker


BrokerDep = Annotated[BrokerLink, Depends(get_broker)]


async def require_device(con: db.Queryable, device_id: str) -> None:
    """404 unless ``device_id`` is registered (``con``: a pool or a connection). A deleted
    device is gone from the API, though its readings stay in storage (and the SQL views)
    until the retention."""
    if not await con.fetchval(sql.DEVICE_EXISTS, device_id):
        raise HTTPException(404, f"device {device_id} not found")


async def lock_device(con: db.Connection, device_id: str) -> None:
    """Lock the device's row for this transaction (FOR UPDATE: writers of the device and
    of what belongs to it take turns); 404 unless it is registered."""
    if await con.fetchval(sql.LOCK_DEVICE, device_id) is None:
        raise HTTPException(404, f"device {device_id} not found")
