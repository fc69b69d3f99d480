"""Stored bytes (blobs.py) over HTTP: parts of an upload taken (firmware images from
operators, routes/firmware.py; files from devices, routes/transfers.py) and an image
served whole or by range (to both)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse

from fleetline import db
from fleetline_api import blobs


async def part_body(request: Request) -> bytes:
    """The part a request carries; 400 when it is empty."""
    data = await request.body()
    if not data:
        raise HTTPException(400, "a part holds at least one byte")
    return data


async def append_part(
    con: db.Connection, blob_id: int, content_range: str | None, data: bytes
) -> tuple[blobs.Blob | None, HTTPException | None]:
    """The part added to the blob in the caller's transaction: the blob as it stands, or
    None and the 422 to answer once the caller has committed (the bytes did not hash as
    declared and their parts were dropped: the upload starts over). Any other refusal is
    raised as its HTTP error."""
    try:
        return await blobs.append(con, blob_id, content_range, data), None
    except blobs.BlobError as exc:
        if exc.status != 422:
            raise HTTPException(exc.status, exc.detail) from exc
        return None, HTTPException(exc.status, exc.detail)


def serve_image(
    pool: Any, blob_id: int, size: int, sha256: str, range_header: str | None
) -> StreamingResponse:
    """A released image, whole or the one range asked (416 outside it)."""
    try:
        span = blobs.byte_range(range_header, size)
    except blobs.BlobError as exc:
        raise HTTPException(
            exc.status, exc.detail, headers={"Content-Range": f"bytes */{size}"}
        ) from exc
    start, end = span or (0, size - 1)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start + 1),
        "ETag": f'"{sha256}"',
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(
        blobs.read(pool, blob_id, start, end),
        status_code=206 if span else 200,
        headers=headers,
        media_type="application/octet-stream",
    )
