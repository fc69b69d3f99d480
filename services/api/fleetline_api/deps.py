"""Dependencies shared by the routers: the pool, and API-key authentication with scopes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetline import apikeys
from fleetline.apikeys import KeyInfo, Scope

if TYPE_CHECKING:
    Pool = asyncpg.Pool[Any]
else:  # FastAPI resolves annotations at run time, where Pool is not subscriptable
    Pool = asyncpg.Pool


async def get_pool(request: Request) -> Pool:
    pool: Pool = request.state.pool
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]
_bearer = HTTPBearer(auto_error=False, description="An API key: flk_<id>_<secret>")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def require(scope: Scope) -> Callable[..., Awaitable[KeyInfo]]:
    """A dependency that lets through keys holding ``scope`` (or ``admin``)."""

    async def check(
        pool: PoolDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> KeyInfo:
        if credentials is None:
            raise HTTPException(
                401, "an API key is required: Authorization: Bearer <key>", headers=_CHALLENGE
            )
        async with pool.acquire() as con:
            key = await apikeys.verify(con, credentials.credentials)
        if key is None:
            raise HTTPException(401, "unknown or revoked API key", headers=_CHALLENGE)
        if scope not in key.scopes and "admin" not in key.scopes:
            raise HTTPException(403, f"this key lacks the {scope} scope")
        return key

    return check


DevicesRead = Annotated[KeyInfo, Depends(require("devices:read"))]
DevicesWrite = Annotated[KeyInfo, Depends(require("devices:write"))]
TelemetryRead = Annotated[KeyInfo, Depends(require("telemetry:read"))]
