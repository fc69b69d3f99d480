"""The device registry.

Credentials: creating a device that logs in with a key issues its key, returned once
with a connection string; ``POST /v1/devices/{id}/key`` issues a new one (the old key and
its tokens stop working, and the broker disconnects the device);
``POST /v1/devices/{id}/token`` signs a short-lived SAS token with the current key,
without revealing the key. A device may instead log in with an X.509 client certificate
(``auth``): one whose thumbprint is registered, or one signed by a verified CA
(routes/cas.py). ``PUT /v1/devices/{id}/auth`` changes how it logs in (rotating
thumbprints), and ``PATCH`` with ``enabled: false`` disables it; either disconnects it.

Deleting a device removes it from the registry and from the API: its telemetry routes
answer 404, and the broker refuses (and disconnects) it. Its readings stay in storage
(and the SQL views) until the raw retention drops them, and so does its last-seen
record, written by ingest; a device registered again with the same id sees its earlier
readings.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Query, Request, Response

from fleetline import certificates, devicekeys
from fleetline_api import commands, registry
from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep, SettingsDep, lock_device
from fleetline_api.params import StatusFilter, TagFilter, device_filter
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import devices as sql
from fleetline_api.schemas.common import (
    MAX_TAGS,
    CaAuth,
    DeviceAuth,
    DeviceCreate,
    DeviceCreated,
    DeviceCredentials,
    DeviceId,
    DevicePage,
    DevicePublic,
    DeviceToken,
    DeviceUpdate,
    GatewayPolicy,
    GatewayRefusal,
    SelfSignedAuth,
    TokenRequest,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/devices", tags=["devices"], responses=RESPONSES)


@router.get("", summary="List devices", response_model=DevicePage)
async def list_devices(
    pool: PoolDep,
    _key: DevicesRead,
    tag: TagFilter = [],  # noqa: B006
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
    parent: Annotated[DeviceId | None, Query(description="Only this gateway's children")] = None,
) -> DevicePage:
    """Devices ordered by id, filtered by tags (string values), connection status and
    gateway."""
    where = device_filter(tag, status, cursor, first=1)
    if where is None:
        return DevicePage(items=[], next_cursor=None)
    conditions, params = where
    rows = await pool.fetch(sql.list_devices(conditions), *params, limit + 1, parent)
    items = [DevicePublic(**dict(r)) for r in rows[:limit]]
    return DevicePage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


@router.post(
    "",
    summary="Register a device (its key shown once)",
    status_code=201,
    response_model=DeviceCreated,
    responses={
        409: {"description": "A device with this id exists, or its parent is not a gateway"}
    },
)
async def create_device(
    body: DeviceCreate, pool: PoolDep, settings: SettingsDep, _key: DevicesWrite
) -> DeviceCreated:
    """Register a device. One that logs in with a key gets it in this response only
    (unless ``issue_key`` is false); an X.509 device logs in with its certificate. A
    gateway has a policy for its children (``gateway``); a child names its gateway
    (``parent``)."""
    await _check_ca(pool, body.auth)
    await _check_gateway(pool, body.gateway)
    if body.gateway is not None and body.parent is not None:
        raise HTTPException(400, "a gateway cannot be behind another gateway (parent)")
    async with pool.acquire() as con, con.transaction():
        if body.parent is not None:
            await _lock_parent(con, body.parent, body.id)
        await con.execute(
            sql.INSERT_DEVICE,
            body.id,
            body.tags,
            body.enabled,
            body.auth.type,
            *_credentials(body.auth),
            _policy(body.gateway),
            body.parent,
        )
        credentials = None
        if body.auth.type == "key" and body.issue_key:
            credentials = await registry.issue_key(con, settings, body.id)
        device = await _get(con, body.id)
    return DeviceCreated(**device.model_dump(), credentials=credentials)


async def _check_gateway(pool: Any, policy: GatewayPolicy | None) -> None:
    if policy is None:
        return
    # A gateway whose key leaks must not be able to claim any id nobody registered yet.
    if policy.create_children and "child_id_pattern" not in policy.model_fields_set:
        raise HTTPException(
            400, "create_children needs a child_id_pattern for the ids it may create"
        )
    await registry.check_pattern(pool, policy.child_id_pattern, "child_id_pattern")


def _policy(policy: GatewayPolicy | None) -> dict[str, Any] | None:
    return None if policy is None else policy.model_dump()


async def _lock_parent(con: Any, parent: str, device_id: str) -> None:
    """The gateway ``device_id`` goes behind, locked until the transaction ends (it
    cannot stop being a gateway meanwhile)."""
    if parent == device_id:
        raise HTTPException(400, "a device cannot be its own parent")
    is_gateway = await con.fetchval(sql.LOCK_GATEWAY, parent)
    if is_gateway is None:
        raise HTTPException(400, f"parent {parent} is not registered")
    if not is_gateway:
        raise HTTPException(409, f"parent {parent} is not a gateway (PATCH its gateway first)")


async def _check_ca(pool: Any, auth: DeviceAuth) -> None:
    if isinstance(auth, CaAuth) and not await pool.fetchval(sql.CA_EXISTS, auth.ca):
        raise HTTPException(400, f"CA {auth.ca} is not registered (POST /v1/cas)")


def _credentials(auth: DeviceAuth) -> tuple[bytes | None, bytes | None, str | None]:
    """Its thumbprints (primary, secondary) and CA."""
    if isinstance(auth, CaAuth):
        return None, None, auth.ca
    if not isinstance(auth, SelfSignedAuth):
        return None, None, None
    secondary = auth.secondary_thumbprint
    return (
        certificates.parse_thumbprint(auth.primary_thumbprint),
        None if secondary is None else certificates.parse_thumbprint(secondary),
        None,
    )


@router.put(
    "/{device_id}/auth",
    summary="Change how a device logs in",
    response_model=DevicePublic,
    responses=NOT_FOUND,
)
async def set_auth(
    device_id: DeviceId, body: DeviceAuth, pool: PoolDep, _key: DevicesWrite
) -> DevicePublic:
    """Change how the device logs in, or rotate its thumbprints. A connected device is
    disconnected and must log in the new way. Leaving ``key`` retires the key: coming
    back to ``key`` needs a new one (``POST /key``)."""
    await _check_ca(pool, body)
    status = await pool.execute(sql.SET_AUTH, device_id, body.type, *_credentials(body))
    if status == "UPDATE 0":
        raise HTTPException(404, f"device {device_id} not found")
    return await _get(pool, device_id)


async def _require_key_auth(con: Any, device_id: str) -> None:
    device = await _get(con, device_id)
    if device.auth.type != "key":
        raise HTTPException(
            409, f"device {device_id} logs in with a certificate ({device.auth.type}), not a key"
        )


@router.post(
    "/{device_id}/key",
    summary="Issue a new device key",
    response_model=DeviceCredentials,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "An X.509 device"}},
)
async def regenerate_key(
    device_id: DeviceId, pool: PoolDep, settings: SettingsDep, _key: DevicesWrite
) -> DeviceCredentials:
    """Issue a new key, shown in this response only. The previous key and every token
    signed with it stop working; the broker disconnects the device."""
    async with pool.acquire() as con, con.transaction():
        await _require_key_auth(con, device_id)
        return await registry.issue_key(con, settings, device_id)


@router.post(
    "/{device_id}/token",
    summary="Make a SAS token for a device",
    response_model=DeviceToken,
    responses={
        **NOT_FOUND,
        409: {"model": Problem, "description": "No key issued yet, or an X.509 device"},
    },
)
async def create_token(
    device_id: DeviceId,
    pool: PoolDep,
    settings: SettingsDep,
    _key: DevicesWrite,
    body: TokenRequest | None = None,
) -> DeviceToken:
    """A SAS token for the device's MQTT login, valid for ``ttl_s`` seconds (default 1 h):
    ``sig=<base64 hmac-sha256(key, "{device_id}\\n{expiry}")>&se=<expiry>``."""
    await _require_key_auth(pool, device_id)
    version = await pool.fetchval(sql.KEY_VERSION, device_id)
    if version is None:
        raise HTTPException(404, f"device {device_id} not found")
    if version == 0:
        raise HTTPException(409, f"device {device_id} has no key yet: POST its /key first")
    key = devicekeys.derive_key(settings.key_secret, device_id, version)
    ttl = (body or TokenRequest()).ttl_s
    token, expiry = devicekeys.sas_token(key, device_id, ttl_seconds=ttl)
    return DeviceToken(
        device_id=device_id,
        token=token,
        expires_at=datetime.fromtimestamp(expiry, UTC),
    )


async def _get(pool: Any, device_id: str) -> DevicePublic:
    row = await pool.fetchrow(sql.SELECT_DEVICE_BY_ID, device_id)
    if row is None:
        raise HTTPException(404, f"device {device_id} not found")
    return DevicePublic(**dict(row))


@router.get(
    "/{device_id}", summary="Get a device", response_model=DevicePublic, responses=NOT_FOUND
)
async def get_device(device_id: DeviceId, pool: PoolDep, _key: DevicesRead) -> DevicePublic:
    """One device with its connection status."""
    return await _get(pool, device_id)


@router.patch(
    "/{device_id}",
    summary="Update a device's tags, state or gateway",
    response_model=DevicePublic,
    responses={
        **NOT_FOUND,
        409: {
            "model": Problem,
            "description": "The parent is not a gateway, or a gateway with children would "
            "stop being one",
        },
    },
)
async def update_device(
    device_id: DeviceId, body: DeviceUpdate, pool: PoolDep, _key: DevicesWrite
) -> DevicePublic:
    """Merge-patch the tags (given keys are set, keys given as null are removed),
    enable or disable the device (a disabled device is refused by the broker and
    disconnected within seconds), make it a gateway or change its policy (``gateway``;
    null: no longer one, once it has no children), move it behind another gateway
    (``parent``; null: behind none), which the broker applies at once."""
    await _check_gateway(pool, body.gateway)
    try:
        async with pool.acquire() as con, con.transaction():
            await lock_device(con, device_id)
            if body.tags is not None:
                tags = await con.fetchval(sql.MERGE_TAGS, device_id, body.tags, MAX_TAGS)
                if tags is None:
                    raise HTTPException(400, f"a device holds at most {MAX_TAGS} tags")
            if body.enabled is not None:
                await con.execute(sql.SET_ENABLED, device_id, body.enabled)
            if body.model_fields_set & {"gateway", "parent"}:
                await _set_family(con, device_id, body)
            return await _get(con, device_id)
    except asyncpg.DeadlockDetectedError:  # two devices moved behind each other at once
        raise HTTPException(
            409, "a concurrent change to these devices' gateways: try again"
        ) from None


async def _set_family(con: Any, device_id: str, body: DeviceUpdate) -> None:
    """``gateway`` and ``parent`` as given (the device locked): one level only, and a
    gateway keeps being one while it has children."""
    family = await con.fetchrow(sql.FAMILY, device_id)
    given = body.model_fields_set
    gateway = body.gateway is not None if "gateway" in given else family["is_gateway"]
    parent = body.parent if "parent" in given else family["parent_id"]
    if gateway and parent is not None:
        raise HTTPException(400, "a gateway cannot be behind another gateway (parent)")
    if not gateway and family["has_children"]:
        raise HTTPException(
            409, f"device {device_id} has children: move them to another gateway first"
        )
    if "gateway" in given:
        await con.execute(sql.SET_GATEWAY, device_id, _policy(body.gateway))
    if "parent" in given:
        if parent is not None:
            await _lock_parent(con, parent, device_id)
        await con.execute(sql.SET_PARENT, device_id, parent)


@router.get(
    "/{device_id}/refusals",
    summary="A gateway's refused children",
    response_model=list[GatewayRefusal],
    responses=NOT_FOUND,
)
async def gateway_refusals(
    device_id: DeviceId,
    pool: PoolDep,
    _key: DevicesRead,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[GatewayRefusal]:
    """What the broker refused this gateway, by child, latest first: publishing or
    subscribing for a device that is not its child (docs/gateways.md). Counts are added
    every few seconds."""
    await _get(pool, device_id)
    rows = await pool.fetch(sql.GATEWAY_REFUSALS, device_id, limit)
    return [GatewayRefusal(**dict(r)) for r in rows]


@router.delete("/{device_id}", summary="Delete a device", status_code=204, responses=NOT_FOUND)
async def delete_device(
    device_id: DeviceId, pool: PoolDep, request: Request, _key: DevicesWrite
) -> Response:
    """Remove a device from the registry (its readings stay until the retention), with
    its modules, twins and the desired documents the broker retains for them."""
    async with pool.acquire() as con, con.transaction():
        # Locked first: a module registered meanwhile waits, then finds the device gone.
        await lock_device(con, device_id)
        modules = await con.fetch(sql.DELETE_MODULES, device_id)
        await con.execute(sql.DELETE_DEVICE, device_id)
    await commands.clear_desired(
        request.state.broker, device_id, ["", *(m["module_id"] for m in modules)]
    )
    return Response(status_code=204)
