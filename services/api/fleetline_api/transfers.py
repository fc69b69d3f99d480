"""Transfers a device asks for over MQTT (docs/ota.md): the API answers with a
short-lived HTTPS URL signed for that device (grants.py).

Request, on ``devices/{id}/transfers/req`` (at most MAX_REQUEST_BYTES of JSON):
``{"id": "<the device's request id>", "op": "download", "firmware": <firmware id>}``.
Answer, on ``devices/{id}/transfers/res``: ``{"id", "status": 200, "url", "expires_at",
"size", "sha256"}``, or ``{"id", "status": 4xx, "error"}``. A device may download a
release only while a rollout of it is updating that device; it asks again for a fresh
URL to resume a download past the URL's expiry.
"""

from __future__ import annotations

import time
from typing import Any

from fleetline import db
from fleetline_api import grants
from fleetline_api.settings import ApiSettings, device_http_url

MAX_REQUEST_BYTES = 1024
REQUEST = "transfers/req"
RESPONSE = "transfers/res"
TRANSFERS_PATH = "/v1/transfers"

# The release, if a rollout of it is updating the device now (from its claim on: the
# device may ask as soon as the notification is out, before it is recorded).
DOWNLOADABLE = """
SELECT b.size, b.sha256 FROM firmware f JOIN blobs b ON b.id = f.blob_id
WHERE f.id = $2 AND f.manifest IS NOT NULL AND EXISTS (
    SELECT 1 FROM job_devices jd JOIN jobs j ON j.id = jd.job_id
    WHERE jd.device_id = $1 AND jd.state = 'running' AND j.type = 'rollout'
      AND (j.spec ->> 'firmware_id')::bigint = f.id)
"""


def refused(status: int, error: str) -> dict[str, Any]:
    return {"status": status, "error": error}


class TransferDesk:
    def __init__(self, settings: ApiSettings, pool: db.Queryable) -> None:
        self._pool = pool
        self._key = grants.grant_key(settings.key_secret)
        self._ttl = settings.transfer_url_ttl_s
        self._base = device_http_url(settings) + TRANSFERS_PATH

    def url(self, kind: str, device_id: str, object_id: int) -> tuple[str, int]:
        """A URL signed for the device, and its expiry (epoch seconds)."""
        expires = int(time.time()) + self._ttl
        token = grants.sign(self._key, grants.Grant(kind, device_id, object_id, expires))
        return f"{self._base}/{token}", expires

    def verify(self, token: str) -> grants.Grant:
        """The grant a URL's token holds (GrantError: not ours, or expired)."""
        return grants.verify(self._key, token)

    async def answer(self, device_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to the device's request (without its id)."""
        op = request.get("op")
        if op == "download":
            return await self._download(device_id, request.get("firmware"))
        return refused(400, "op is download")

    async def _download(self, device_id: str, firmware_id: Any) -> dict[str, Any]:
        if type(firmware_id) is not int or not 1 <= firmware_id < 2**63:
            return refused(400, "firmware is the id of the release to download")
        row = await self._pool.fetchrow(DOWNLOADABLE, device_id, firmware_id)
        if row is None:
            return refused(403, f"no rollout of firmware {firmware_id} is updating this device")
        url, expires = self.url("firmware", device_id, firmware_id)
        return {
            "status": 200,
            "url": url,
            "expires_at": expires,
            "size": row["size"],
            "sha256": row["sha256"],
        }
