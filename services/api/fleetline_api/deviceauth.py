"""A device proving itself over HTTPS (transfers: docs/ota.md).

``Authorization: SharedAccessSignature sr=<device id>&sig=<base64>&se=<expiry>``: a SAS
token as the device logs in to the broker with (fleetline/devicekeys.py), with the
device it speaks for in ``sr``. A device logging in with a certificate cannot make one:
the API does not see client certificates (TLS ends at it or at a proxy in front), so
such a device's short-lived transfer URL, given to it over its own MQTT connection, is
its credential on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from fastapi import HTTPException

from fleetline import db, devicekeys

SCHEME = "SharedAccessSignature "
DEVICE = "SELECT key_version, enabled, auth FROM devices WHERE id = $1"


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a request says it is: the device in ``sr`` and its token."""

    device_id: str
    token: str


def claim(authorization: str | None) -> Claim | None:
    """The device a request speaks for (None: no device credentials); 401 when the
    header is there but not a device's SAS token."""
    if authorization is None:
        return None
    if not authorization.startswith(SCHEME):
        raise HTTPException(401, "a device proves itself with a SharedAccessSignature token")
    fields = dict(
        part.partition("=")[::2] for part in authorization.removeprefix(SCHEME).split("&")
    )
    device_id, sig, expiry = fields.get("sr"), fields.get("sig"), fields.get("se")
    if not device_id or not sig or not expiry:
        raise HTTPException(401, "the SharedAccessSignature token needs sr, sig and se")
    return Claim(unquote(device_id), f"sig={unquote(sig)}&se={expiry}")


async def check(con: db.Queryable, secret: bytes, device_id: str, who: Claim | None) -> None:
    """Let through ``device_id`` proving itself (or, logging in with a certificate, not
    claiming to be anyone else); else 401 (no or bad credentials) or 403 (another
    device, or a disabled one)."""
    if who is not None and who.device_id != device_id:
        raise HTTPException(403, "this URL was signed for another device")
    row = await con.fetchrow(DEVICE, device_id)
    if row is None:
        raise HTTPException(403, "this URL was signed for a device that is not registered")
    if not row["enabled"]:
        raise HTTPException(403, f"device {device_id} is disabled")
    if row["auth"] != "key":
        return
    if who is None:
        raise HTTPException(
            401,
            "the device must prove itself: Authorization: SharedAccessSignature "
            "sr=<device id>&sig=...&se=...",
        )
    key = devicekeys.derive_key(secret, device_id, row["key_version"])
    if not devicekeys.verify_password(key, device_id, who.token):
        raise HTTPException(401, "bad or expired SharedAccessSignature token")
