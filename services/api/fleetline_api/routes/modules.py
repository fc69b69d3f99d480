"""Modules of a device (docs/protocol.md, section 8: ``{device_id}/{module_id}``).

A module is a named part of a device's software (a sensor driver, an app on a gateway)
with its own twin and direct methods. It speaks over its device's connection and
credentials, under ``devices/{id}/modules/{module_id}/``: its twin and methods are served
by routes/twins.py and routes/methods.py. Here: the registry of modules.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from fleetline_api import commands
from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep, lock_device, require_device
from fleetline_api.problems import CONFLICT, NOT_FOUND, RESPONSES
from fleetline_api.queries import modules as sql
from fleetline_api.schemas.common import DeviceId, ModuleId, ModuleList, ModulePublic

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/devices", tags=["modules"], responses=RESPONSES)

MAX_MODULES = 100


@router.get(
    "/{device_id}/modules",
    summary="List a device's modules",
    response_model=ModuleList,
    responses=NOT_FOUND,
)
async def list_modules(device_id: DeviceId, pool: PoolDep, _key: DevicesRead) -> ModuleList:
    """The device's modules."""
    async with pool.acquire() as con:
        await require_device(con, device_id)
        rows = await con.fetch(sql.LIST_MODULES, device_id)
    return ModuleList(items=[ModulePublic(**dict(r)) for r in rows])


@router.put(
    "/{device_id}/modules/{module_id}",
    summary="Add or replace a module",
    response_model=ModulePublic,
    status_code=201,
    responses={
        **NOT_FOUND,
        200: {"model": ModulePublic, "description": "The module exists already"},
        **{409: {**CONFLICT[409], "description": f"The device has {MAX_MODULES} modules"}},
    },
)
async def put_module(
    device_id: DeviceId,
    module_id: ModuleId,
    pool: PoolDep,
    response: Response,
    _key: DevicesWrite,
) -> ModulePublic:
    """Register a module (201); one that exists is returned as it is (200)."""
    async with pool.acquire() as con, con.transaction():
        # The device's row lock serialises concurrent registrations (the count below).
        await lock_device(con, device_id)
        row = await con.fetchrow(sql.SELECT_MODULE, device_id, module_id)
        if row is not None:
            response.status_code = 200
            return ModulePublic(**dict(row))
        count = await con.fetchval(sql.COUNT_MODULES, device_id)
        if count >= MAX_MODULES:
            raise HTTPException(409, f"device {device_id} has {count} modules, the most allowed")
        created: Any = await con.fetchrow(sql.CREATE_MODULE, device_id, module_id)
    log.info("module registered", extra={"device_id": device_id, "module_id": module_id})
    return ModulePublic(**dict(created))


@router.get(
    "/{device_id}/modules/{module_id}",
    summary="Get a module",
    response_model=ModulePublic,
    responses=NOT_FOUND,
)
async def get_module(
    device_id: DeviceId, module_id: ModuleId, pool: PoolDep, _key: DevicesRead
) -> ModulePublic:
    row = await pool.fetchrow(sql.SELECT_MODULE, device_id, module_id)
    if row is None:
        raise HTTPException(404, f"{commands.target_name(device_id, module_id)} not found")
    return ModulePublic(**dict(row))


@router.delete(
    "/{device_id}/modules/{module_id}",
    summary="Delete a module",
    status_code=204,
    responses=NOT_FOUND,
)
async def delete_module(
    device_id: DeviceId, module_id: ModuleId, pool: PoolDep, request: Request, _key: DevicesWrite
) -> Response:
    """Remove a module with its twin and the desired document the broker retains for it."""
    status = await pool.execute(sql.DELETE_MODULE, device_id, module_id)
    if status.endswith(" 0"):
        raise HTTPException(404, f"{commands.target_name(device_id, module_id)} not found")
    await commands.clear_desired(request.state.broker, device_id, [module_id])
    log.info("module deleted", extra={"device_id": device_id, "module_id": module_id})
    return Response(status_code=204)
