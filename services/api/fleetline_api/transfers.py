"""Transfers a device asks for over MQTT (docs/ota.md, docs/uploads.md): the API answers
with a short-lived HTTPS URL signed for that device (grants.py).

Requests, on ``devices/{id}/transfers/req`` (at most MAX_REQUEST_BYTES of JSON), and
answers on ``devices/{id}/transfers/res``, ``{"id", "status": 4xx, "error"}`` when
refused:
- ``{"id": "<the device's request id>", "op": "download", "firmware": <firmware id>}``:
  ``{"id", "status": 200, "url", "expires_at", "size", "sha256"}``. A device may
  download a release only while a rollout of it is updating that device.
- ``{"id", "op": "upload", "name", "size", "sha256", "content_type"}``: ``{"id",
  "status": 200, "url", "expires_at", "file_id", "received"}``; the device PUTs the
  bytes from ``received`` on. Asking again for the same name, size and SHA-256 resumes
  that upload; another file of an unfinished name replaces it; a finished name is 409.
  413 beyond FLEETLINE_API_UPLOAD_MAX_BYTES or the device's quota.
A device asks again for a fresh URL to go on past the URL's expiry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import asyncpg

from fleetline_api import blobs, grants
from fleetline_api.queries import files as files_sql
from fleetline_api.settings import ApiSettings, device_http_url

log = logging.getLogger(__name__)

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


FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\Z")
CONTENT_TYPE = re.compile(r"[!-~][ -~]{0,127}\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
SWEEP_BATCH = 100


def refused(status: int, error: str) -> dict[str, Any]:
    return {"status": status, "error": error}


def _upload_problem(request: dict[str, Any], max_bytes: int) -> dict[str, Any] | None:
    name, size = request.get("name"), request.get("size")
    if not isinstance(name, str) or not FILE_NAME.match(name):
        return refused(400, "name is 1-128 letters, digits and _.- (not starting with .)")
    if type(size) is not int or size < 1:
        return refused(400, "size is the file's size in bytes")
    if not isinstance(request.get("sha256"), str) or not SHA256.match(request["sha256"]):
        return refused(400, "sha256 is the file's SHA-256, 64 lower-case hex digits")
    content_type = request.get("content_type", "application/octet-stream")
    if not isinstance(content_type, str) or not CONTENT_TYPE.match(content_type):
        return refused(400, "content_type is a media type, printable ASCII")
    if size > max_bytes:
        return refused(413, f"the file is {size:,} bytes, more than {max_bytes:,}")
    return None


class TransferDesk:
    def __init__(self, settings: ApiSettings, pool: asyncpg.Pool[Any]) -> None:
        self._settings = settings
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
        if op == "upload":
            return await self._upload(device_id, request)
        return refused(400, "op is download or upload")

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

    async def _upload(self, device_id: str, request: dict[str, Any]) -> dict[str, Any]:
        settings = self._settings
        problem = _upload_problem(request, settings.upload_max_bytes)
        if problem is not None:
            return problem
        name, size, sha256 = request["name"], request["size"], request["sha256"]
        content_type = request.get("content_type", "application/octet-stream")
        async with self._pool.acquire() as con, con.transaction():
            if await con.fetchval(files_sql.LOCK_DEVICE, device_id) is None:
                return refused(404, "this device is not registered")
            row = await con.fetchrow(files_sql.LOCK_BY_NAME, device_id, name)
            if row is not None and row["state"] == "complete":
                return refused(409, f"{name} was uploaded already: delete it, or use another name")
            if row is not None and (row["size"], row["sha256"]) == (size, sha256):
                file_id, received = row["id"], row["received"]
                await con.execute(files_sql.EXTEND, file_id, settings.upload_ttl_s)
            else:
                if row is not None:  # another file under an unfinished name: replaced
                    await con.execute(files_sql.DELETE, row["id"])
                used = await con.fetchval(files_sql.USED, device_id)
                if used + size > settings.upload_quota_bytes:
                    return refused(
                        413,
                        f"the device keeps {used:,} bytes; {size:,} more is past its quota "
                        f"of {settings.upload_quota_bytes:,}",
                    )
                blob_id = await blobs.create(con, size, sha256)
                file_id = await con.fetchval(
                    files_sql.INSERT, device_id, name, content_type, blob_id, settings.upload_ttl_s
                )
                received = 0
        url, expires = self.url("upload", device_id, file_id)
        return {
            "status": 200,
            "url": url,
            "expires_at": expires,
            "file_id": file_id,
            "received": received,
        }

    async def run(self) -> None:
        """Delete unfinished uploads past their expiry, now and then, until cancelled."""
        while True:
            try:
                while True:
                    status = await self._pool.execute(files_sql.EXPIRED, SWEEP_BATCH)
                    deleted = int(status.rsplit(" ", 1)[-1])
                    if deleted:
                        log.info(
                            "unfinished uploads past their expiry deleted", extra={"files": deleted}
                        )
                    if deleted < SWEEP_BATCH:
                        break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("unfinished uploads not swept: %r", exc)
            await asyncio.sleep(self._settings.upload_sweep_s)
