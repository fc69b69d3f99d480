"""Device credentials the registry issues, and the id patterns it keeps: shared by the
device routes (gateways' child id patterns) and provisioning (registration patterns)."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import HTTPException

from fleetline import db, devicekeys
from fleetline_api.queries import devices as sql
from fleetline_api.schemas.common import DeviceCredentials
from fleetline_api.settings import ApiSettings


def credentials(settings: ApiSettings, device_id: str, version: int) -> DeviceCredentials:
    """The device's key for ``version``, with its connection string."""
    key = devicekeys.derive_key(settings.key_secret, device_id, version)
    broker = settings.device_mqtt
    return DeviceCredentials(
        device_id=device_id,
        key=key,
        key_version=version,
        connection_string=devicekeys.connection_string(
            host=broker.host, port=broker.port, device_id=device_id, key=key
        ),
    )


async def issue_key(con: db.Connection, settings: ApiSettings, device_id: str) -> DeviceCredentials:
    """A new key version for the device (the old key stops working); 404 when the
    device does not exist."""
    version = await con.fetchval(sql.ISSUE_KEY, device_id)
    if version is None:
        raise HTTPException(404, f"device {device_id} not found")
    issued = credentials(settings, device_id, version)
    await con.execute(sql.STORE_FINGERPRINT, device_id, version, devicekeys.fingerprint(issued.key))
    return issued


# The pattern on its own and wrapped must both compile: "x)|(?:.*" compiles only wrapped,
# where it would match any id.
CHECK_PATTERN = "SELECT '' ~ $1, '' ~ ('^(?:' || $1 || ')$')"


async def check_pattern(pool: Any, pattern: str, field: str) -> None:
    """400 unless ``pattern`` is a PostgreSQL regular expression an id can be matched
    against as a whole."""
    try:
        await pool.fetchval(CHECK_PATTERN, pattern)
    except asyncpg.DataError as exc:  # an invalid regular expression, among others
        raise HTTPException(400, f"{field} cannot be used: {exc}") from exc
