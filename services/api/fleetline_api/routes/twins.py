"""Device twins: desired properties set here, reported properties sent by the device.

``PATCH`` takes a JSON merge patch (RFC 7396) of the desired properties, applied in the
database by ``fleetline_merge_patch`` (migrations/0013, which ingest uses for reported
patches too). ``If-Match`` is optional: with it, the patch applies only to that desired
version (the ``ETag`` of GET and PATCH), else 412; without it, the last writer wins.

After the commit, the whole desired document ``{"version": n, "desired": {...}}`` is
published retained, QoS 1, on ``devices/{id}/twin/desired``, so a device that connects
later receives the current state at once. The API refuses a change (503) while it is not
connected to the broker. If the publish after the commit fails, the change stays
(``desired_published_version`` then lags ``desired_version``) and the next PATCH of that
device, even ``{}``, publishes the current document again. Publishing holds the twin's
row lock and reads the document under it, so concurrent PATCHes publish in version
order. One gap remains: a publish that timed out stays queued in the MQTT client and may
still go out after a newer one from another API process, leaving the older version
retained until the next PATCH; devices should ignore a ``version`` lower than one they
have applied. The patch and the publish are fleetline_api/commands.py (shared with
twin jobs).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, Response

from fleetline import db, protocol
from fleetline_api import commands
from fleetline_api.commands import etag
from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import twins as sql
from fleetline_api.schemas.bodies import read_json_body
from fleetline_api.schemas.common import DeviceId, ModuleId
from fleetline_api.schemas.twins import (
    DESIRED_PATCH_SCHEMA,
    MERGE_PATCH_MEDIA_TYPE,
    TwinPublic,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/devices", tags=["twins"], responses=RESPONSES)

ACCEPTED_MEDIA_TYPES = (MERGE_PATCH_MEDIA_TYPE, "application/json")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true and 1 differ (Python's == says they are equal), 1 and 1.0 not."""
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


_ABSENT = object()


def delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The desired members whose reported value differs or is absent; nested objects on
    both sides are compared member by member."""
    out: dict[str, Any] = {}
    for key, want in desired.items():
        have = reported.get(key, _ABSENT)
        if isinstance(want, dict) and isinstance(have, dict):
            inner = delta(want, have)
            if inner:
                out[key] = inner
        elif have is _ABSENT or not _same(want, have):
            out[key] = want
    return out


async def _twin(con: db.Queryable, device_id: str, module_id: str = "") -> TwinPublic:
    row = await con.fetchrow(sql.SELECT_TWIN, device_id, module_id)
    if row is None:
        raise HTTPException(404, f"{commands.target_name(device_id, module_id)} not found")
    fields = dict(row)
    return TwinPublic(**fields, delta=delta(fields["desired"], fields["reported"]))


@router.get(
    "/{device_id}/twin",
    summary="Get a device's twin",
    response_model=TwinPublic,
    responses=NOT_FOUND,
)
async def get_twin(
    device_id: DeviceId, pool: PoolDep, _key: DevicesRead, response: Response
) -> TwinPublic:
    """The device's twin: tags, desired and reported properties with their versions and
    times of last change, and the delta. The ``ETag`` is the desired version, for
    ``If-Match`` on PATCH."""
    twin = await _twin(pool, device_id)
    response.headers["ETag"] = etag(twin.desired_version)
    return twin


@router.get(
    "/{device_id}/modules/{module_id}/twin",
    summary="Get a module's twin",
    response_model=TwinPublic,
    responses=NOT_FOUND,
)
async def get_module_twin(
    device_id: DeviceId, module_id: ModuleId, pool: PoolDep, _key: DevicesRead, response: Response
) -> TwinPublic:
    """A module's twin, as the device's (its ``tags`` are the device's)."""
    twin = await _twin(pool, device_id, module_id)
    response.headers["ETag"] = etag(twin.desired_version)
    return twin


async def _read_patch(request: Request) -> dict[str, Any]:
    patch = await read_json_body(
        request,
        max_bytes=protocol.MAX_TWIN_BYTES,
        media_types=ACCEPTED_MEDIA_TYPES,
        what="patch",
    )
    if type(patch) is not dict:
        # RFC 7396 would let a non-object replace the document; desired stays an object.
        raise HTTPException(422, "the patch must be a JSON object")
    problem = protocol.twin_patch_problem(patch)
    if problem:
        raise HTTPException(400, problem)
    return patch


PATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **NOT_FOUND,
    412: {"model": Problem, "description": "If-Match names another desired version"},
    413: {"model": Problem, "description": "The patch or the resulting document is too large"},
    415: {"model": Problem, "description": "Not application/merge-patch+json"},
    503: {
        "model": Problem,
        "description": "The database did not answer, or the API is not connected to the broker",
    },
}
# (A member set to null is removed: FastAPI's document cannot show a null here.)
PATCH_EXAMPLES: dict[str, Any] = {
    "set": {
        "summary": "Set a property and merge into an object",
        "value": {"interval_s": 30, "display": {"brightness": 70}},
    }
}
PATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            t: {"schema": DESIRED_PATCH_SCHEMA, "examples": PATCH_EXAMPLES}
            for t in ACCEPTED_MEDIA_TYPES
        },
    }
}
IfMatch = Annotated[
    str | None,
    Header(
        max_length=1024,
        description='The desired version the patch is for, as its ETag ("3"); '
        "optional: without it the patch applies to whatever version is current",
    ),
]


async def _patch(
    request: Request,
    response: Response,
    pool: Any,
    device_id: str,
    module_id: str,
    if_match: str | None,
) -> TwinPublic:
    patch = await _read_patch(request)
    try:
        await commands.apply_desired(
            pool, request.state.broker, device_id, patch, if_match=if_match, module_id=module_id
        )
    except commands.CommandError as exc:
        raise HTTPException(exc.status, str(exc), headers=exc.headers or None) from None
    twin = await _twin(pool, device_id, module_id)
    response.headers["ETag"] = etag(twin.desired_version)
    log.info(
        "desired twin patched",
        extra={
            "device_id": device_id,
            "module_id": module_id,
            "version": twin.desired_version,
            "published": twin.desired_published_version == twin.desired_version,
        },
    )
    return twin


@router.patch(
    "/{device_id}/twin",
    summary="Patch a device's desired properties",
    response_model=TwinPublic,
    responses=PATCH_RESPONSES,
    openapi_extra=PATCH_BODY,
)
async def patch_desired(
    device_id: DeviceId,
    request: Request,
    response: Response,
    pool: PoolDep,
    _key: DevicesWrite,
    if_match: IfMatch = None,
) -> TwinPublic:
    """Merge-patch the desired properties (RFC 7396) and publish the whole desired
    document, retained, to ``devices/{id}/twin/desired``. A patch that changes nothing
    keeps the version and publishes the current document again."""
    return await _patch(request, response, pool, device_id, "", if_match)


@router.patch(
    "/{device_id}/modules/{module_id}/twin",
    summary="Patch a module's desired properties",
    response_model=TwinPublic,
    responses=PATCH_RESPONSES,
    openapi_extra=PATCH_BODY,
)
async def patch_module_desired(
    device_id: DeviceId,
    module_id: ModuleId,
    request: Request,
    response: Response,
    pool: PoolDep,
    _key: DevicesWrite,
    if_match: IfMatch = None,
) -> TwinPublic:
    """As for the device's twin; published to
    ``devices/{id}/modules/{module_id}/twin/desired``."""
    return await _patch(request, response, pool, device_id, module_id, if_match)
