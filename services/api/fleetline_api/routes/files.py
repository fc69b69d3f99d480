"""Files uploaded by devices (docs/uploads.md): listed, read (whole or by range) and
deleted over REST. Devices upload them with URLs they ask for over MQTT (transfers.py,
routes/transfers.py). Reading needs ``devices:read``, deleting ``devices:write``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response

from fleetline_api import downloads
from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep, require_device
from fleetline_api.problems import CONFLICT, NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import files as sql
from fleetline_api.schemas.common import DeviceId
from fleetline_api.schemas.files import DeviceFile, DeviceFilePage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/devices", tags=["files"], responses=RESPONSES)

FileId = Annotated[int, Path(ge=1, le=2**63 - 1)]


async def _file(pool: Any, device_id: str, file_id: int) -> Any:
    async with pool.acquire() as con:
        row = await con.fetchrow(sql.GET, device_id, file_id)
        if row is None:
            await require_device(con, device_id)
            raise HTTPException(404, f"device {device_id} has no file {file_id}")
    return row


@router.get(
    "/{device_id}/files",
    summary="List a device's uploaded files",
    response_model=DeviceFilePage,
    responses=NOT_FOUND,
)
async def list_files(
    device_id: DeviceId,
    pool: PoolDep,
    _key: DevicesRead,
    state: Annotated[str | None, Query(pattern="^(uploading|complete)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> DeviceFilePage:
    """The device's files, newest first (unfinished uploads too); `state` filters."""
    async with pool.acquire() as con:
        await require_device(con, device_id)
        rows = await con.fetch(sql.LIST, device_id, state, cursor, limit + 1)
    items = [DeviceFile.from_row(r) for r in rows[:limit]]
    return DeviceFilePage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


@router.get(
    "/{device_id}/files/{file_id}",
    summary="Get an uploaded file's details",
    response_model=DeviceFile,
    responses=NOT_FOUND,
)
async def get_file(
    device_id: DeviceId, file_id: FileId, pool: PoolDep, _key: DevicesRead
) -> DeviceFile:
    """One file: its name, size, SHA-256, content type and state."""
    return DeviceFile.from_row(await _file(pool, device_id, file_id))


@router.get(
    "/{device_id}/files/{file_id}/content",
    summary="Download an uploaded file",
    responses={
        **NOT_FOUND,
        **CONFLICT,
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
        206: {"content": {"application/octet-stream": {}}, "description": "The range asked"},
        416: {"model": Problem, "description": "The range is not within the file"},
    },
    response_class=Response,
)
async def get_content(
    device_id: DeviceId,
    file_id: FileId,
    pool: PoolDep,
    _key: DevicesRead,
    range_header: Annotated[
        str | None, Header(alias="range", description="bytes=START-END, START- or -N")
    ] = None,
) -> Response:
    """The file's bytes, whole or one range, with the content type the device gave."""
    row = await _file(pool, device_id, file_id)
    if row["state"] != "complete":
        raise HTTPException(
            409, f"file {file_id} is still uploading ({row['received']:,} of {row['size']:,} bytes)"
        )
    response = downloads.serve_image(pool, row["blob_id"], row["size"], row["sha256"], range_header)
    response.headers["Content-Type"] = row["content_type"]
    response.headers["Content-Disposition"] = f'attachment; filename="{row["name"]}"'
    return response


@router.delete(
    "/{device_id}/files/{file_id}",
    summary="Delete an uploaded file",
    status_code=204,
    responses=NOT_FOUND,
)
async def delete_file(
    device_id: DeviceId, file_id: FileId, pool: PoolDep, key: DevicesWrite
) -> Response:
    """Delete a file (or an unfinished upload) and its bytes."""
    async with pool.acquire() as con:
        if await con.fetchval(sql.DELETE_FILE, device_id, file_id) is None:
            await require_device(con, device_id)
            raise HTTPException(404, f"device {device_id} has no file {file_id}")
    log.info(
        "device file deleted", extra={"device_id": device_id, "file_id": file_id, "key_id": key.id}
    )
    return Response(status_code=204)
