"""Firmware releases (docs/ota.md): an image uploaded in parts, then released with a
manifest signed by the release key, which devices check before they apply it.

``POST /v1/firmware`` declares a release (version, target, kind, size, SHA-256); its
image follows in parts, ``PUT /v1/firmware/{id}/content`` with ``Content-Range``, in
order, each within the API's body limit, so an upload of any size goes through and an
interrupted one resumes where ``received`` says. The part that completes it checks the
bytes' SHA-256 against the declared one (a mismatch drops the parts: 422) and releases
it: the manifest (fleetline/releases.py) is signed then. ``GET .../content`` serves the
image, with ``Range`` for downloads that resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response

from fleetline import releases
from fleetline_api import blobs, downloads
from fleetline_api.deps import FirmwareRead, FirmwareWrite, PoolDep, SettingsDep
from fleetline_api.openapi import BINARY_BODY
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import firmware as sql
from fleetline_api.schemas.firmware import (
    FirmwareCreate,
    FirmwareList,
    FirmwarePublic,
    ReleaseKey,
    ReleaseName,
)

if TYPE_CHECKING:
    from fleetline.db import Queryable

router = APIRouter(prefix="/v1/firmware", tags=["firmware"], responses=RESPONSES)
key_router = APIRouter(prefix="/v1/release-key", tags=["firmware"], responses=RESPONSES)

FirmwareId = Annotated[int, Path(ge=1, le=2**63 - 1)]
NO_KEY = (
    "the API has no release key to sign releases with: set "
    "FLEETLINE_API_RELEASE_KEY_FILE (`fleetline firmware keygen` makes one)"
)
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "Not possible in the release's state"}
}


def _release_key(request: Request) -> ec.EllipticCurvePrivateKey:
    key: ec.EllipticCurvePrivateKey | None = request.state.release_key
    if key is None:
        raise HTTPException(409, NO_KEY)
    return key


async def _get(db: Queryable, firmware_id: int) -> FirmwarePublic:
    row = await db.fetchrow(sql.GET_FIRMWARE, firmware_id)
    if row is None:
        raise HTTPException(404, f"firmware {firmware_id} not found")
    return FirmwarePublic(**dict(row))


@key_router.get(
    "",
    summary="The public key releases are signed with",
    response_model=ReleaseKey,
    responses=CONFLICT,
)
async def get_release_key(request: Request, _key: FirmwareRead) -> ReleaseKey:
    """The release key's public half, for the boards' configuration."""
    return ReleaseKey(public_key=releases.public_point(_release_key(request)).hex())


@router.post(
    "",
    summary="Create a firmware release",
    status_code=201,
    response_model=FirmwarePublic,
    responses=CONFLICT,
)
async def create_firmware(
    body: FirmwareCreate,
    request: Request,
    pool: PoolDep,
    settings: SettingsDep,
    _key: FirmwareWrite,
) -> FirmwarePublic:
    """Declare a release; upload its image next (``PUT .../content``)."""
    _release_key(request)
    if body.size > settings.firmware_max_bytes:
        raise HTTPException(
            400,
            f"an image is at most {settings.firmware_max_bytes:,} bytes "
            "(FLEETLINE_API_FIRMWARE_MAX_BYTES)",
        )
    async with pool.acquire() as con, con.transaction():
        blob_id = await blobs.create(con, body.size, body.sha256)
        try:
            firmware_id = await con.fetchval(
                sql.INSERT_FIRMWARE, body.version, body.target, body.kind, body.notes, blob_id
            )
        except asyncpg.UniqueViolationError as exc:
            raise HTTPException(409, f"{body.target} already has a release {body.version}") from exc
    return await _get(pool, int(firmware_id))


@router.put(
    "/{firmware_id}/content",
    summary="Upload a part of a release's image",
    response_model=FirmwarePublic,
    responses={
        **NOT_FOUND,
        **CONFLICT,
        400: {"model": Problem, "description": "No or a wrong Content-Range"},
        422: {"model": Problem, "description": "The bytes' SHA-256 is not the declared one"},
    },
    openapi_extra=BINARY_BODY,
)
async def upload_part(
    firmware_id: FirmwareId,
    request: Request,
    pool: PoolDep,
    _key: FirmwareWrite,
    content_range: Annotated[
        str | None,
        Header(
            description="bytes START-END/SIZE: where this part goes; START must be "
            "the release's `received`"
        ),
    ] = None,
) -> FirmwarePublic:
    """One part of the image, in order. The last one checks the SHA-256 and releases it,
    its manifest signed with the release key."""
    data = await downloads.part_body(request)
    async with pool.acquire() as con:
        async with con.transaction():
            row = await con.fetchrow(sql.LOCK_FIRMWARE, firmware_id)
            if row is None:
                raise HTTPException(404, f"firmware {firmware_id} not found")
            blob, refused = await downloads.append_part(con, row["blob_id"], content_range, data)
            # Refused without a release key (the part rolls back with the transaction).
            key = _release_key(request)
            if blob is not None and blob.complete:
                manifest = releases.Manifest(
                    version=row["version"],
                    target=row["target"],
                    kind=row["kind"],
                    size=blob.size,
                    sha256=blob.sha256,
                )
                await con.execute(
                    sql.RELEASE,
                    firmware_id,
                    manifest.to_bytes().decode(),
                    releases.sign(key, manifest).hex(),
                )
        if refused is not None:  # the reset of its parts is committed, then refused
            raise refused
        return await _get(con, firmware_id)


@router.get("", summary="List firmware releases", response_model=FirmwareList)
async def list_firmware(
    pool: PoolDep,
    _key: FirmwareRead,
    target: Annotated[
        ReleaseName | None, Query(description="Only releases for this target")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FirmwareList:
    """Releases, newest first, uploading ones included."""
    rows = await pool.fetch(sql.LIST_FIRMWARE, target, limit)
    return FirmwareList(items=[FirmwarePublic(**dict(r)) for r in rows])


@router.get(
    "/{firmware_id}",
    summary="Get a firmware release",
    response_model=FirmwarePublic,
    responses=NOT_FOUND,
)
async def get_firmware(
    firmware_id: FirmwareId, pool: PoolDep, _key: FirmwareRead
) -> FirmwarePublic:
    return await _get(pool, firmware_id)


@router.get(
    "/{firmware_id}/content",
    summary="Download a release's image",
    responses={
        **NOT_FOUND,
        **CONFLICT,
        200: {"content": {"application/octet-stream": {}}, "description": "The image"},
        206: {"content": {"application/octet-stream": {}}, "description": "The range asked"},
        416: {"model": Problem, "description": "The range is not within the image"},
    },
    response_class=Response,
)
async def get_content(
    firmware_id: FirmwareId,
    pool: PoolDep,
    _key: FirmwareRead,
    range_header: Annotated[
        str | None, Header(alias="range", description="bytes=START-END, START- or -N")
    ] = None,
) -> Response:
    """The released image, whole or one range of it."""
    row = await pool.fetchrow(sql.GET_CONTENT, firmware_id)
    if row is None:
        raise HTTPException(404, f"firmware {firmware_id} not found")
    firmware, blob_id = FirmwarePublic(**dict(row)), int(row["blob_id"])
    if firmware.status != "released":
        raise HTTPException(
            409,
            f"firmware {firmware_id} is still uploading "
            f"({firmware.received:,} of {firmware.size:,} bytes)",
        )
    return downloads.serve_image(pool, blob_id, firmware.size, firmware.sha256, range_header)


@router.delete(
    "/{firmware_id}",
    summary="Delete a firmware release",
    status_code=204,
    responses={
        **NOT_FOUND,
        409: {
            "model": Problem,
            "description": "A rollout that has not finished puts it on devices",
        },
    },
)
async def delete_firmware(firmware_id: FirmwareId, pool: PoolDep, _key: FirmwareWrite) -> Response:
    """Delete a release and its image (not while a rollout of it runs)."""
    async with pool.acquire() as con, con.transaction():
        blob_id = await con.fetchval(sql.DELETE_FIRMWARE, firmware_id)
        if blob_id is None:
            raise HTTPException(404, f"firmware {firmware_id} not found")
        rollout = await con.fetchval(sql.UNFINISHED_ROLLOUT, firmware_id)
        if rollout is not None:
            raise HTTPException(
                409,
                f"rollout {rollout} of firmware {firmware_id} has not finished: cancel it first",
            )
        await blobs.delete(con, blob_id)
    return Response(status_code=204)
