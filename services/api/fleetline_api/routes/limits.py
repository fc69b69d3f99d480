"""Per-device limits: messages and bytes a second, with bursts, that the broker lets a
device publish (the auth plugin enforces them before ingest sees a message).

One default applies to every device; an override names a device or a tag value (a
device's own override first, then the first matching tag by name). A change reaches
connected devices within seconds. Each device's refused publishes are counted
(``GET /v1/devices/{id}/limits``).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep, require_device
from fleetline_api.problems import NOT_FOUND, RESPONSES
from fleetline_api.queries import limits as sql
from fleetline_api.schemas.common import DeviceId, TagName, TagText
from fleetline_api.schemas.limits import (
    DeviceLimits,
    Limits,
    LimitsList,
    LimitsPublic,
    Refusals,
)

router = APIRouter(prefix="/v1/limits", tags=["limits"], responses=RESPONSES)
device_router = APIRouter(prefix="/v1/devices", tags=["limits"], responses=RESPONSES)


@router.get("", summary="List device limits", response_model=LimitsList)
async def list_limits(pool: PoolDep, _key: DevicesRead) -> LimitsList:
    """The default, then the overrides of devices, then those of tags."""
    return LimitsList(items=[LimitsPublic(**dict(r)) for r in await pool.fetch(sql.LIST_LIMITS)])


async def _put(
    pool: PoolDep,
    body: Limits,
    selector: str,
    device: str | None = None,
    tag: tuple[str, str] | None = None,
) -> LimitsPublic:
    name, value = tag or (None, None)
    row = await pool.fetchrow(
        sql.PUT_LIMITS,
        selector,
        device,
        name,
        value,
        body.messages_per_second,
        body.burst_messages,
        body.bytes_per_second,
        body.burst_bytes,
    )
    assert row is not None  # INSERT ... RETURNING
    return LimitsPublic(**dict(row))


@router.put("/default", summary="Set the default device limits", response_model=LimitsPublic)
async def put_default(body: Limits, pool: PoolDep, _key: DevicesWrite) -> LimitsPublic:
    """The limits of every device without an override."""
    return await _put(pool, body, "default")


@router.put("/devices/{device_id}", summary="Set a device's limits", response_model=LimitsPublic)
async def put_device_limits(
    device_id: DeviceId, body: Limits, pool: PoolDep, _key: DevicesWrite
) -> LimitsPublic:
    """An override for one device (registered or not yet)."""
    return await _put(pool, body, f"device:{device_id}", device=device_id)


@router.put(
    "/tags/{name}/{value}",
    summary="Set the limits of devices with a tag",
    response_model=LimitsPublic,
)
async def put_tag_limits(
    name: TagName, value: TagText, body: Limits, pool: PoolDep, _key: DevicesWrite
) -> LimitsPublic:
    """An override for the devices whose tag ``name`` is ``value`` (as text)."""
    return await _put(pool, body, f"tag:{name}={value}", tag=(name, value))


async def _delete(pool: PoolDep, selector: str) -> Response:
    if await pool.execute(sql.DELETE_LIMITS, selector) == "DELETE 0":
        raise HTTPException(404, f"no override {selector}")
    return Response(status_code=204)


@router.delete(
    "/devices/{device_id}", summary="Remove a device's limits", status_code=204, responses=NOT_FOUND
)
async def delete_device_limits(device_id: DeviceId, pool: PoolDep, _key: DevicesWrite) -> Response:
    return await _delete(pool, f"device:{device_id}")


@router.delete(
    "/tags/{name}/{value}",
    summary="Remove the limits of a tag",
    status_code=204,
    responses=NOT_FOUND,
)
async def delete_tag_limits(
    name: TagName, value: TagText, pool: PoolDep, _key: DevicesWrite
) -> Response:
    return await _delete(pool, f"tag:{name}={value}")


@device_router.get(
    "/{device_id}/limits",
    summary="A device's limits and refused publishes",
    response_model=DeviceLimits,
    responses=NOT_FOUND,
)
async def device_limits(device_id: DeviceId, pool: PoolDep, _key: DevicesRead) -> DeviceLimits:
    """The limits that apply to the device, and its publishes refused over them."""
    await require_device(pool, device_id)
    limits = await pool.fetchrow(sql.LIMITS_OF, device_id)
    refused = await pool.fetchrow(sql.REFUSALS_OF, device_id)
    return DeviceLimits(
        device_id=device_id,
        limits=LimitsPublic(**dict(limits)) if limits else None,
        refused=Refusals(**dict(refused)) if refused else None,
    )
