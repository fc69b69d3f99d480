"""``/v1/transfers/{grant}``: what a device downloads (GET) or uploads (PUT) with the
short-lived URL it asked for over MQTT (transfers.py). No API key: the URL is signed for
one device and one firmware or file (grants.py), and the device proves itself as well
(deviceauth.py). 403 for a URL past its expiry, not signed here, or signed for another
device; 401 when the device's credentials are missing or wrong.

An upload goes in parts, each a PUT with ``Content-Range: bytes START-END/SIZE`` starting
where the upload stands (409 says where otherwise), so an interrupted one resumes. The
last part checks the SHA-256 (422 and the upload starts over when it differs), completes
the file and announces it on the live stream (``{"type": "file", ...}``). A part that
goes past the declared size is 413.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request
from fastapi.responses import Response

from fleetline import streamevents
from fleetline_api import blobs, deviceauth, downloads, grants
from fleetline_api.deps import PoolDep, SettingsDep
from fleetline_api.openapi import BINARY_BODY
from fleetline_api.problems import RESPONSES, Problem
from fleetline_api.queries import files as files_sql
from fleetline_api.queries import firmware as sql
from fleetline_api.schemas.files import DeviceFile
from fleetline_api.transfers import TRANSFERS_PATH, TransferDesk

router = APIRouter(prefix=TRANSFERS_PATH, tags=["transfers"], responses=RESPONSES)

Token = Annotated[str, Path(max_length=grants.MAX_TOKEN_CHARS, description="The grant")]


def _granted(kind: str) -> Callable[..., Awaitable[grants.Grant]]:
    """A dependency: the URL's grant, for a ``kind`` transfer, and the device it was
    signed for proving itself (403, 401)."""

    async def check(
        token: Token,
        request: Request,
        pool: PoolDep,
        settings: SettingsDep,
        authorization: Annotated[str | None, Header(max_length=1024)] = None,
    ) -> grants.Grant:
        desk: TransferDesk = request.state.transfers
        try:
            grant = desk.verify(token)
        except grants.GrantError as exc:
            raise HTTPException(403, str(exc)) from None
        if grant.kind != kind:
            raise HTTPException(403, f"this URL is for a {grant.kind} transfer, not a {kind} one")
        await deviceauth.check(
            pool, settings.key_secret, grant.device_id, deviceauth.claim(authorization)
        )
        return grant

    return check


FirmwareGrant = Annotated[grants.Grant, Depends(_granted("firmware"))]
UploadGrant = Annotated[grants.Grant, Depends(_granted("upload"))]


@router.get(
    "/{token}",
    summary="Download with a transfer URL (devices)",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The image"},
        206: {"content": {"application/octet-stream": {}}, "description": "The range asked"},
        401: {"model": Problem, "description": "The device's credentials are missing or wrong"},
        403: {"model": Problem, "description": "Expired, not signed here, or another device's"},
        404: {"model": Problem, "description": "The release was deleted meanwhile"},
        416: {"model": Problem, "description": "The range is not within the image"},
    },
    response_class=Response,
)
async def download(
    grant: FirmwareGrant,
    pool: PoolDep,
    range_header: Annotated[
        str | None, Header(alias="range", description="bytes=START-END, START- or -N")
    ] = None,
) -> Response:
    """A firmware image, whole or one range of it (a download resumes with Range)."""
    row = await pool.fetchrow(sql.GET_CONTENT, grant.object_id)
    if row is None or row["manifest"] is None:
        raise HTTPException(404, f"firmware {grant.object_id} is no longer there")
    return downloads.serve_image(
        pool, int(row["blob_id"]), row["size"], row["sha256"], range_header
    )


def _oversize(content_range: str | None, size: int) -> None:
    """413 for a part that goes past the upload's declared size."""
    found = blobs.CONTENT_RANGE.fullmatch(content_range or "")
    if found and (int(found.group(2)) >= size or int(found.group(3)) > size):
        raise HTTPException(413, f"the upload is {size:,} bytes: this part goes past it")


@router.put(
    "/{token}",
    summary="Upload a part with a transfer URL (devices)",
    response_model=DeviceFile,
    responses={
        400: {"model": Problem, "description": "No or a wrong Content-Range"},
        401: {"model": Problem, "description": "The device's credentials are missing or wrong"},
        403: {"model": Problem, "description": "Expired, not signed here, or another device's"},
        404: {"model": Problem, "description": "The upload was deleted (expired) meanwhile"},
        409: {"model": Problem, "description": "Not where the upload stands, or complete"},
        413: {"model": Problem, "description": "Past the declared size"},
        422: {"model": Problem, "description": "The SHA-256 is not the declared one"},
    },
    openapi_extra=BINARY_BODY,
)
async def upload(
    grant: UploadGrant,
    request: Request,
    pool: PoolDep,
    content_range: Annotated[
        str | None, Header(description="bytes START-END/SIZE; START is the upload's received")
    ] = None,
) -> DeviceFile:
    """One part of a file the device uploads, in order; the last completes it."""
    data = await downloads.part_body(request)
    async with pool.acquire() as con:
        async with con.transaction():
            row = await con.fetchrow(files_sql.LOCK, grant.object_id)
            if row is None or row["device_id"] != grant.device_id:
                raise HTTPException(404, f"upload {grant.object_id} is no longer there")
            _oversize(content_range, row["size"])
            blob, refused = await downloads.append_part(con, row["blob_id"], content_range, data)
            complete = blob is not None and blob.complete
            if complete:
                await con.fetchval(files_sql.COMPLETE, grant.object_id)
            done: Any = await con.fetchrow(files_sql.GET, grant.device_id, grant.object_id)
            landed = DeviceFile.from_row(done)
            if complete:
                event = {
                    "type": "file",
                    "device_id": grant.device_id,
                    "ts": landed.completed_at,
                    "file": landed.model_dump(mode="json"),
                }
                await streamevents.announce(con, [event])
        if refused is not None:  # the reset of its parts is committed, then refused
            raise refused
    return landed
