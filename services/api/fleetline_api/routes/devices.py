"""The device registry.

Deleting a device removes it from the registry and from the API: its telemetry routes
answer 404. Its readings stay in storage (and the SQL views) until the raw retention
drops them, and so does its last-seen record, written by ingest; a device registered
again with the same id sees its earlier readings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import StringConstraints

from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep
from fleetline_api.problems import NOT_FOUND, RESPONSES
from fleetline_api.schemas import (
    MAX_TAGS,
    DeviceCreate,
    DeviceId,
    DevicePage,
    DevicePublic,
    DeviceUpdate,
)

router = APIRouter(prefix="/v1/devices", tags=["devices"], responses=RESPONSES)

SELECT_DEVICE = """
SELECT d.id, d.tags, d.created_at, coalesce(a.online, false) AS online, a.last_seen,
       a.status_changed_at
FROM devices d LEFT JOIN device_activity a ON a.device_id = d.id
"""


def parse_tags(tag: list[str]) -> dict[str, str] | None:
    """The filter as an object; None when it asks one tag for two values (nothing matches).
    The query pattern guarantees name=value."""
    wanted: dict[str, str] = {}
    for name, _sep, value in (item.partition("=") for item in tag):
        if wanted.setdefault(name, value) != value:
            return None
    return wanted


TagFilter = Annotated[
    list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}=.{0,256}$")]],
    Query(description="name=value (string values); repeat to require several"),
]
StatusFilter = Annotated[Literal["online", "offline"] | None, Query()]


def device_filter(
    tag: list[str], status: str | None, cursor: str | None, *, first: int
) -> tuple[str, list[Any]] | None:
    """SQL conditions on devices ``d`` (with their activity ``a``) and their parameters,
    numbered from ``$first``: tags, connection status, and the page after ``cursor``.
    None when no device can match (one tag asked for two values)."""
    wanted = parse_tags(tag)
    if wanted is None:
        return None
    t, s, c = first, first + 1, first + 2
    sql = (
        f"(${t}::jsonb IS NULL OR d.tags @> ${t}::jsonb)"
        f" AND (${s}::bool IS NULL OR coalesce(a.online, false) = ${s})"
        f" AND (${c}::text IS NULL OR d.id > ${c})"
    )
    return sql, [wanted or None, None if status is None else status == "online", cursor]


@router.get("", response_model=DevicePage)
async def list_devices(
    pool: PoolDep,
    _key: DevicesRead,
    tag: TagFilter = [],  # noqa: B006
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> DevicePage:
    """Devices ordered by id, filtered by tags (string values) and connection status."""
    where = device_filter(tag, status, cursor, first=1)
    if where is None:
        return DevicePage(items=[], next_cursor=None)
    sql, params = where
    rows = await pool.fetch(
        f"{SELECT_DEVICE} WHERE {sql} ORDER BY d.id LIMIT $4", *params, limit + 1
    )
    items = [DevicePublic(**dict(r)) for r in rows[:limit]]
    return DevicePage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


@router.post(
    "",
    status_code=201,
    response_model=DevicePublic,
    responses={409: {"description": "A device with this id exists"}},
)
async def create_device(body: DeviceCreate, pool: PoolDep, _key: DevicesWrite) -> DevicePublic:
    """Register a device."""
    await pool.execute("INSERT INTO devices (id, tags) VALUES ($1, $2)", body.id, body.tags)
    return await _get(pool, body.id)


async def _get(pool: Any, device_id: str) -> DevicePublic:
    row = await pool.fetchrow(SELECT_DEVICE + "WHERE d.id = $1", device_id)
    if row is None:
        raise HTTPException(404, f"device {device_id} not found")
    return DevicePublic(**dict(row))


@router.get("/{device_id}", response_model=DevicePublic, responses=NOT_FOUND)
async def get_device(device_id: DeviceId, pool: PoolDep, _key: DevicesRead) -> DevicePublic:
    """One device with its connection status."""
    return await _get(pool, device_id)


@router.patch("/{device_id}", response_model=DevicePublic, responses=NOT_FOUND)
async def update_device(
    device_id: DeviceId, body: DeviceUpdate, pool: PoolDep, _key: DevicesWrite
) -> DevicePublic:
    """Merge-patch the tags: given keys are set, keys given as null are removed."""
    tags = await pool.fetchval(
        """
        WITH merged AS (
            SELECT id, jsonb_strip_nulls(tags || $2::jsonb) AS tags FROM devices WHERE id = $1
        )
        UPDATE devices d SET tags = m.tags, updated_at = now() FROM merged m
        WHERE d.id = m.id AND (SELECT count(*) FROM jsonb_object_keys(m.tags)) <= $3
        RETURNING d.tags
        """,
        device_id,
        body.tags,
        MAX_TAGS,
    )
    if tags is None:
        await _get(pool, device_id)  # 404 when it does not exist
        raise HTTPException(400, f"a device holds at most {MAX_TAGS} tags")
    return await _get(pool, device_id)


@router.delete("/{device_id}", status_code=204, responses=NOT_FOUND)
async def delete_device(device_id: DeviceId, pool: PoolDep, _key: DevicesWrite) -> Response:
    """Remove a device from the registry (its readings stay until the retention)."""
    status = await pool.execute("DELETE FROM devices WHERE id = $1", device_id)
    if status.endswith(" 0"):
        raise HTTPException(404, f"device {device_id} not found")
    return Response(status_code=204)
