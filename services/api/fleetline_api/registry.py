"""Device credentials the registry issues: shared by the device routes and provisioning."""

from __future__ import annotations

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
