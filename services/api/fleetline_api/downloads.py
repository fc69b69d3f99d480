"""Serving a stored image (blobs.py) over HTTP, whole or by range: firmware content for
operators (routes/firmware.py) and devices (routes/transfers.py)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from fleetline_api import blobs


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
