"""Enrollments: who may register itself, and the registrations they took.

See provisioning.py for what a registration does. A symmetric-key enrollment's key is
shown once, when it is created or renewed (``POST /{id}/key``: devices provisioned with
the old one keep their own device keys; new registrations need the new one).
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, HTTPException, Query, Response

from fleetline import certificates, devicekeys, protocol
from fleetline_api import registry
from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep, SettingsDep
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import provisioning as sql
from fleetline_api.schemas.common import DeviceId
from fleetline_api.schemas.enrollments import (
    EnrollmentCreate,
    EnrollmentCreated,
    EnrollmentList,
    EnrollmentPublic,
    EnrollmentUpdate,
    RegistrationPage,
    RegistrationPublic,
)
from fleetline_api.settings import ApiSettings

router = APIRouter(prefix="/v1/enrollments", tags=["enrollments"], responses=RESPONSES)


async def _check_pattern(pool: Any, pattern: str | None) -> None:
    if pattern is not None:
        await registry.check_pattern(pool, pattern, "registration_pattern")


def _check_desired(desired: dict[str, Any] | None) -> None:
    if desired is None:
        return
    problem = protocol.twin_patch_problem(desired)
    if problem is None and len(orjson.dumps(desired)) > protocol.MAX_TWIN_BYTES:
        problem = f"more than {protocol.MAX_TWIN_BYTES} bytes"
    if problem is not None:
        raise HTTPException(400, f"initial_desired: {problem}")


def _enrollment_key(settings: ApiSettings, row: Any) -> str | None:
    if row["attestation"] != "symmetric_key":
        return None
    return devicekeys.enrollment_key(settings.key_secret, row["id"], row["key_version"])


@router.post(
    "",
    summary="Create an enrollment",
    status_code=201,
    response_model=EnrollmentCreated,
    responses={409: {"model": Problem, "description": "The id is taken"}},
)
async def create_enrollment(
    body: EnrollmentCreate, pool: PoolDep, settings: SettingsDep, _key: DevicesWrite
) -> EnrollmentCreated:
    """Create an enrollment; a symmetric-key one's key is in this response only."""
    x509 = body.attestation == "x509"
    if x509 and body.kind == "group" and body.ca is None:
        raise HTTPException(400, "an x509 group names its CA (ca)")
    if x509 and body.kind == "individual" and body.thumbprint is None:
        raise HTTPException(400, "an x509 individual enrollment names its thumbprint")
    if not x509 and (body.ca or body.thumbprint):
        raise HTTPException(400, "ca and thumbprint belong to x509 enrollments")
    if body.kind == "group" and body.thumbprint or body.kind == "individual" and body.ca:
        raise HTTPException(400, "a group names a CA, an individual enrollment a thumbprint")
    await _check_pattern(pool, body.registration_pattern)
    _check_desired(body.initial_desired)
    if body.ca is not None and not await pool.fetchval(sql.CA_VERIFIED, body.ca):
        raise HTTPException(400, f"CA {body.ca} is not registered and verified")
    thumbprint = None if body.thumbprint is None else certificates.parse_thumbprint(body.thumbprint)
    try:
        row = await pool.fetchrow(
            sql.INSERT_ENROLLMENT,
            body.id,
            body.kind,
            body.attestation,
            body.ca,
            thumbprint,
            body.registration_pattern,
            body.initial_tags,
            body.initial_desired,
            body.reprovision,
            body.enabled,
        )
    except asyncpg.UniqueViolationError as exc:
        raise HTTPException(409, f"enrollment {body.id} exists") from exc
    assert row is not None  # INSERT ... RETURNING
    return EnrollmentCreated(**dict(row), key=_enrollment_key(settings, row))


@router.get("", summary="List enrollments", response_model=EnrollmentList)
async def list_enrollments(pool: PoolDep, _key: DevicesRead) -> EnrollmentList:
    return EnrollmentList(
        items=[EnrollmentPublic(**dict(r)) for r in await pool.fetch(sql.LIST_ENROLLMENTS)]
    )


def _found(row: Any, enrollment_id: str) -> EnrollmentPublic:
    if row is None:
        raise HTTPException(404, f"enrollment {enrollment_id} not found")
    return EnrollmentPublic(**dict(row))


@router.get(
    "/{enrollment_id}",
    summary="Get an enrollment",
    response_model=EnrollmentPublic,
    responses=NOT_FOUND,
)
async def get_enrollment(
    enrollment_id: DeviceId, pool: PoolDep, _key: DevicesRead
) -> EnrollmentPublic:
    return _found(await pool.fetchrow(sql.GET_ENROLLMENT, enrollment_id), enrollment_id)


@router.patch(
    "/{enrollment_id}",
    summary="Update an enrollment",
    response_model=EnrollmentPublic,
    responses=NOT_FOUND,
)
async def update_enrollment(
    enrollment_id: DeviceId, body: EnrollmentUpdate, pool: PoolDep, _key: DevicesWrite
) -> EnrollmentPublic:
    """Change the pattern, initial tags and twin, reprovision policy, or disable it (a
    disabled enrollment refuses registrations; its devices keep working)."""
    await _check_pattern(pool, body.registration_pattern)
    _check_desired(body.initial_desired)
    row = await pool.fetchrow(
        sql.UPDATE_ENROLLMENT,
        enrollment_id,
        body.registration_pattern,
        body.initial_tags,
        body.initial_desired,
        body.reprovision,
        body.enabled,
    )
    return _found(row, enrollment_id)


@router.post(
    "/{enrollment_id}/key",
    summary="Renew an enrollment's key",
    response_model=EnrollmentCreated,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "An x509 enrollment"}},
)
async def renew_enrollment_key(
    enrollment_id: DeviceId, pool: PoolDep, settings: SettingsDep, _key: DevicesWrite
) -> EnrollmentCreated:
    """A new enrollment key, shown in this response only; the old one stops working."""
    row = await pool.fetchrow(sql.NEW_ENROLLMENT_KEY, enrollment_id)
    if row is None:
        _found(await pool.fetchrow(sql.GET_ENROLLMENT, enrollment_id), enrollment_id)
        raise HTTPException(409, f"enrollment {enrollment_id} attests with X.509, not a key")
    return EnrollmentCreated(**dict(row), key=_enrollment_key(settings, row))


@router.delete(
    "/{enrollment_id}", summary="Delete an enrollment", status_code=204, responses=NOT_FOUND
)
async def delete_enrollment(enrollment_id: DeviceId, pool: PoolDep, _key: DevicesWrite) -> Response:
    """Delete the enrollment and its registrations; the devices it made stay."""
    if await pool.execute(sql.DELETE_ENROLLMENT, enrollment_id) == "DELETE 0":
        raise HTTPException(404, f"enrollment {enrollment_id} not found")
    return Response(status_code=204)


@router.get(
    "/{enrollment_id}/registrations",
    summary="List an enrollment's registrations",
    response_model=RegistrationPage,
    responses=NOT_FOUND,
)
async def list_registrations(
    enrollment_id: DeviceId,
    pool: PoolDep,
    _key: DevicesRead,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> RegistrationPage:
    """The enrollment's registrations by registration id: each one's latest outcome."""
    _found(await pool.fetchrow(sql.GET_ENROLLMENT, enrollment_id), enrollment_id)
    rows = await pool.fetch(sql.LIST_REGISTRATIONS, enrollment_id, cursor, limit + 1)
    items = [RegistrationPublic(**dict(r)) for r in rows[:limit]]
    return RegistrationPage(
        items=items, next_cursor=items[-1].registration_id if len(rows) > limit else None
    )
