"""Blobs: large bytes uploaded in parts and read back by range, kept in PostgreSQL so
that every API replica serves every blob (migrations/0028_create_firmware.sql).

An upload declares its size and SHA-256 first. Each part is one request (PUT with
``Content-Range: bytes START-END/SIZE``) and must start where the blob's received bytes
end, so a client that lost a connection asks how far it got and goes on from there.
The part that completes the blob also checks its hash: a blob whose bytes are not what
was declared loses its parts and starts over, so nothing incomplete or corrupt is ever
served. This is the one interface the routes use; an object store behind it would keep
the same calls.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetline.db import Connection, Queryable

CONTENT_RANGE = re.compile(r"bytes (\d{1,15})-(\d{1,15})/(\d{1,15})", re.ASCII)
RANGE = re.compile(r"bytes=(\d{0,15})-(\d{0,15})", re.ASCII)
# Parts read from the database per query when a blob is hashed or served (each at most
# the API's body limit, 1 MiB by default).
READ_BATCH = 4


class BlobError(Exception):
    """A request the blob cannot take: ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str, received: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.received = received


@dataclass(frozen=True)
class Blob:
    id: int
    size: int
    sha256: str
    received: int
    complete: bool


def part_range(header: str | None, size: int, length: int) -> int:
    """The start of a part from its Content-Range, checked against the blob's size and
    the part's length; BlobError 400 otherwise."""
    found = CONTENT_RANGE.fullmatch(header or "")
    if not found:
        raise BlobError(400, "each part needs Content-Range: bytes START-END/SIZE")
    start, end, total = (int(g) for g in found.groups())
    if total != size:
        raise BlobError(400, f"the upload is {size:,} bytes, not {total:,}")
    if end < start or end >= size:
        raise BlobError(400, f"bytes {start}-{end} are not within the upload's {size:,}")
    if end - start + 1 != length:
        raise BlobError(
            400, f"the part is {length:,} bytes, its Content-Range says {end - start + 1:,}"
        )
    return start


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end] of a Range header of one byte range (None: the whole blob, also for
    a header in another unit or of several ranges, which a server may ignore); BlobError
    416 when the range is not within the blob."""
    if header is None or not header.strip().startswith("bytes=") or "," in header:
        return None
    found = RANGE.fullmatch(header.strip())
    if not found or found.groups() == ("", ""):
        raise BlobError(416, "a range reads bytes=START-END, bytes=START- or bytes=-N")
    first, last = found.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise BlobError(416, f"the range is not within the {size:,} bytes")
    return start, end


async def create(con: Connection, size: int, sha256: str) -> int:
    return int(
        await con.fetchval(
            "INSERT INTO blobs (size, sha256) VALUES ($1, $2) RETURNING id", size, sha256
        )
    )


async def append(con: Connection, blob_id: int, content_range: str | None, data: bytes) -> Blob:
    """Add the part ``data``, placed by its Content-Range, in the caller's transaction
    (the blob's row is locked); when it is the last, the blob is complete if its bytes
    hash as declared. BlobError 400 for a Content-Range that does not fit the blob, 409
    for a part out of order or a complete blob, 422 for a hash that does not match (the
    parts are dropped: the caller commits that and the upload starts over)."""
    row = await con.fetchrow(
        "SELECT id, size, sha256, received, complete FROM blobs WHERE id = $1 FOR UPDATE", blob_id
    )
    if row is None:
        raise BlobError(404, "no such upload")
    blob = Blob(**dict(row))
    start = part_range(content_range, blob.size, len(data))
    if blob.complete:
        raise BlobError(409, "the upload is complete", blob.received)
    if start != blob.received:
        raise BlobError(409, f"the next part starts at byte {blob.received}", blob.received)
    await con.execute(
        "INSERT INTO blob_parts (blob_id, start, data) VALUES ($1, $2, $3)", blob_id, start, data
    )
    received = blob.received + len(data)
    complete = received == blob.size
    if complete and await _sha256(con, blob_id) != blob.sha256:
        await con.execute("DELETE FROM blob_parts WHERE blob_id = $1", blob_id)
        await con.execute("UPDATE blobs SET received = 0 WHERE id = $1", blob_id)
        raise BlobError(
            422, "the bytes' SHA-256 is not the one declared: the upload starts over", 0
        )
    await con.execute(
        "UPDATE blobs SET received = $2, complete = $3 WHERE id = $1", blob_id, received, complete
    )
    return Blob(blob.id, blob.size, blob.sha256, received, complete)


async def _sha256(con: Connection, blob_id: int) -> str:
    digest = hashlib.sha256()
    async for chunk in read(con, blob_id, 0):
        digest.update(chunk)
    return digest.hexdigest()


async def read(
    con: Queryable, blob_id: int, start: int, end: int | None = None
) -> AsyncIterator[bytes]:
    """The blob's bytes from ``start`` to ``end`` (inclusive; None: the last), a few
    parts per query (each by the primary key), so memory holds only those."""
    at = start
    # The part that holds ``start``; then the parts after it, which follow contiguously.
    rows = await con.fetch(
        "SELECT start, data FROM blob_parts WHERE blob_id = $1 AND start <= $2"
        " ORDER BY start DESC LIMIT 1",
        blob_id,
        at,
    )
    while rows:
        for row in rows:
            data: bytes = row["data"]
            lo = at - row["start"]
            hi = len(data) if end is None else min(len(data), end - row["start"] + 1)
            if lo >= hi or lo < 0:
                return  # past the end asked, or a gap (parts are contiguous: none)
            yield data[lo:hi]
            at = row["start"] + hi
            if end is not None and at > end:
                return
        rows = await con.fetch(
            "SELECT start, data FROM blob_parts WHERE blob_id = $1 AND start >= $2"
            " ORDER BY start LIMIT $3",
            blob_id,
            at,
            READ_BATCH,
        )


async def delete(con: Connection, blob_id: int) -> None:
    await con.execute("DELETE FROM blobs WHERE id = $1", blob_id)
