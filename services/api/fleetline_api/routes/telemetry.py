"""Telemetry of one device: raw points, time buckets, and the latest value of each metric.

Buckets come from the hourly or minute rollups when the bucket width and the range are
whole hours or minutes, and from raw rows otherwise. Hours whose rollups are still
pending (plain PostgreSQL, a few seconds behind) are aggregated from their raw rows in
the same query, so both sources give the same answer.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import StringConstraints, TypeAdapter, ValidationError

from fleetline_api.deps import PoolDep, TelemetryRead, require_device
from fleetline_api.params import StatusFilter, TagFilter, device_filter
from fleetline_api.problems import NOT_FOUND, RESPONSES
from fleetline_api.queries import telemetry as sql
from fleetline_api.schemas.common import (
    Aggregates,
    Bucket,
    DeviceId,
    DeviceValue,
    FleetLatest,
    Latest,
    MetricName,
    MetricValue,
    Point,
    PointPage,
    Rfc3339,
)

router = APIRouter(prefix="/v1/devices", tags=["telemetry"], responses=RESPONSES)
fleet_router = APIRouter(prefix="/v1/latest", tags=["telemetry"], responses=RESPONSES)

DEFAULT_RANGE = timedelta(hours=24)
# Buckets in one answer, over all the metrics asked for.
MAX_BUCKETS = 10_000
MAX_BUCKET_WIDTH = timedelta(days=366)
# Buckets start at this origin (not at `from`), so their edges do not move between calls
# and match the rollups' buckets.
BUCKET_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
# Times a query may name: no reading lies outside (ingest refuses them).
FIRST_TIME, LAST_TIME = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)
AGGS = ("avg", "min", "max", "count", "last")
AggList = Annotated[
    str, StringConstraints(pattern=r"^(avg|min|max|count|last)(,(avg|min|max|count|last))*$")
]


def _time(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.upper().replace(" ", "T"))
        if FIRST_TIME <= value <= LAST_TIME:
            return value
    except (ValueError, OverflowError):
        raise HTTPException(400, f"'{name}' {text!r} is not a valid time") from None
    raise HTTPException(400, f"'{name}' must lie between {FIRST_TIME.year} and {LAST_TIME.year}")


def _range(start_text: str | None, end_text: str | None) -> tuple[datetime, datetime]:
    start, end = _time("from", start_text), _time("to", end_text)
    end = end or datetime.now(UTC)
    start = start or max(FIRST_TIME, end - DEFAULT_RANGE)
    if start >= end:
        raise HTTPException(400, "'from' must be before 'to'")
    return start, end


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = TypeAdapter(timedelta)


def _parse_bucket(text: str) -> timedelta:
    text = text.strip()
    try:
        if text[-1:] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
            width = timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
        elif text.replace(".", "", 1).isdigit():
            width = timedelta(seconds=float(text))
        elif "Y" in text.upper().partition("T")[0] or "M" in text.upper().partition("T")[0]:
            raise HTTPException(400, "'bucket' in years or months has no fixed width; use days")
        else:
            width = _DURATION.validate_python(text)
    except (ValidationError, ValueError, OverflowError):
        raise HTTPException(
            400, f"'bucket' {text[:40]!r} is not seconds, 5m/1h/1d, or an ISO 8601 duration"
        ) from None
    if width < timedelta(seconds=1):
        raise HTTPException(400, "'bucket' must be at least 1 second")
    if width > MAX_BUCKET_WIDTH:
        raise HTTPException(400, f"'bucket' must be at most {MAX_BUCKET_WIDTH.days} days")
    return width


Source = Literal["telemetry", "telemetry_1m", "telemetry_1h"]
ROLLUPS: tuple[tuple[Source, timedelta], ...] = (
    ("telemetry_1h", timedelta(hours=1)),
    ("telemetry_1m", timedelta(minutes=1)),
)


def _rollup_for(
    bucket: timedelta, start: datetime, end: datetime, horizons: dict[str, timedelta]
) -> Source | None:
    """The coarsest rollup whose buckets tile the request exactly and that still holds
    the whole range (rollups are kept for their own retention), if any."""
    now = datetime.now(UTC)
    for table, granularity in ROLLUPS:
        if bucket % granularity or any((t - BUCKET_ORIGIN) % granularity for t in (start, end)):
            continue
        if start < now - horizons.get(table, timedelta(0)):
            continue
        return table
    return None


def _encode_cursor(ts: datetime, series_id: int) -> str:
    return base64.urlsafe_b64encode(f"{ts.isoformat()}|{series_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        ts_text, _, sid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        ts = datetime.fromisoformat(ts_text)
        if ts.tzinfo is None:
            raise ValueError
        return ts, int(sid)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "'cursor' is not one this API returned") from None


@router.get(
    "/{device_id}/latest",
    summary="A device's latest value of each metric",
    response_model=Latest,
    responses=NOT_FOUND,
)
async def latest(device_id: DeviceId, pool: PoolDep, _key: TelemetryRead) -> Latest:
    """The last stored value of each of the device's metrics, with its time."""
    await require_device(pool, device_id)
    rows = await pool.fetch(sql.LATEST, device_id)
    return Latest(
        device_id=device_id,
        metrics={
            r["metric"]: MetricValue(ts=r["ts"], value=r["value"], value_text=r["value_text"])
            for r in rows
        },
    )


@router.get(
    "/{device_id}/telemetry",
    summary="A device's readings, raw or in buckets",
    response_model=PointPage | Aggregates,
    responses=NOT_FOUND,
)
async def telemetry(
    request: Request,
    device_id: DeviceId,
    pool: PoolDep,
    _key: TelemetryRead,
    metric: Annotated[list[MetricName], Query(description="Repeat for several; all if none")] = [],  # noqa: B006
    start: Annotated[Rfc3339 | None, Query(alias="from", description="Default: to - 24 h")] = None,
    end: Annotated[Rfc3339 | None, Query(alias="to", description="Default: now")] = None,
    bucket: Annotated[
        str | None,
        Query(
            max_length=40,
            description="Bucket width: seconds (`300`), `5m`/`1h`/`1d`, or ISO 8601 (`PT1H`); "
            "aggregates instead of raw points",
        ),
    ] = None,
    agg: Annotated[
        list[AggList],
        Query(
            description="With bucket: avg,min,max,count,last (comma list or repeated); default all"
        ),
    ] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PointPage | Aggregates:
    """Raw points in time order (paged), or time-bucketed aggregates when `bucket` is set."""
    since, until = _range(start, end)
    await require_device(pool, device_id)
    metrics = metric or None
    if bucket is not None:
        width = _parse_bucket(bucket)
        chosen = [a for a in AGGS if any(a in item.split(",") for item in agg)] or list(AGGS)
        return await _aggregates(
            pool, request.state.retention, device_id, metrics, since, until, width, chosen
        )
    after_ts, after_sid = _decode_cursor(cursor) if cursor else (None, None)
    rows = await pool.fetch(
        sql.POINTS,
        device_id,
        metrics,
        since,
        until,
        after_ts,
        after_sid,
        limit + 1,
    )
    items = [
        Point(ts=r["ts"], metric=r["metric"], value=r["value"], value_text=r["value_text"])
        for r in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = _encode_cursor(last["ts"], last["sid"])
    return PointPage(items=items, next_cursor=next_cursor)


async def _aggregates(
    pool: PoolDep,
    horizons: dict[str, timedelta],
    device_id: str,
    metrics: list[str] | None,
    start: datetime,
    end: datetime,
    bucket: timedelta,
    aggs: list[str],
) -> Aggregates:
    width = bucket.total_seconds()
    buckets = (end - start).total_seconds() / width
    series = await pool.fetchval(sql.COUNT_SERIES, device_id, metrics)
    if buckets * max(1, series) > MAX_BUCKETS:
        raise HTTPException(
            400,
            f"that asks for up to {buckets * max(1, series):,.0f} buckets ({series} metric(s)); "
            f"at most {MAX_BUCKETS:,}: widen 'bucket', narrow the range or name metrics",
        )
    source = _rollup_for(bucket, start, end, horizons)
    args = (device_id, metrics, start, end, bucket, BUCKET_ORIGIN)
    if source is None:
        rows = await pool.fetch(sql.buckets_from_raw(aggs), *args)
    else:
        rows = await pool.fetch(sql.buckets_from_rollup(source), *args)
    used: Source = source if source is not None else "telemetry"
    return Aggregates(
        bucket_seconds=width,
        source=used,
        items=[Bucket(**{k: r[k] for k in ("bucket", "metric", *aggs)}) for r in rows],
    )


@fleet_router.get(
    "", summary="One metric's latest value on every device", response_model=FleetLatest
)
async def fleet_latest(
    pool: PoolDep,
    _key: TelemetryRead,
    metric: MetricName,
    tag: TagFilter = [],  # noqa: B006
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> FleetLatest:
    """The last value of one metric on every registered device that has it (a fleet
    table), ordered by device id, filtered like the device list."""
    where = device_filter(tag, status, cursor, first=2)
    if where is None:
        return FleetLatest(metric=metric, items=[], next_cursor=None)
    conditions, params = where
    rows = await pool.fetch(sql.fleet_latest(conditions), metric, *params, limit + 1)
    items = [DeviceValue(**dict(r)) for r in rows[:limit]]
    return FleetLatest(
        metric=metric, items=items, next_cursor=items[-1].device_id if len(rows) > limit else None
    )
