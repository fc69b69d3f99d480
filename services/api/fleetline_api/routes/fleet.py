"""``/v1/fleet``: the fleet at a glance, for dashboards: how many devices (online,
offline) under the filters of ``GET /v1/devices``, and how far back telemetry reaches
(raw readings, minute and hour rollups), so that a chart offers only ranges there is data
for."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from fleetline_api.deps import DevicesRead, PoolDep, TelemetryRead
from fleetline_api.params import TagFilter, device_filter
from fleetline_api.problems import RESPONSES
from fleetline_api.queries import devices as sql
from fleetline_api.schemas.common import DeviceId

router = APIRouter(prefix="/v1/fleet", tags=["devices"], responses=RESPONSES)


class FleetCounts(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"total": 1200, "online": 1130, "offline": 70}]}
    )
    total: int = Field(description="Devices registered that match the filters")
    online: int
    offline: int


class Retention(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"raw_s": 7776000, "minute_rollups_s": 7776000, "hour_rollups_s": 63072000}
            ]
        }
    )
    raw_s: int = Field(description="Seconds raw readings are kept")
    minute_rollups_s: int = Field(description="Seconds the per-minute rollups are kept")
    hour_rollups_s: int = Field(description="Seconds the per-hour rollups are kept")


@router.get("/counts", summary="Count the fleet's devices", response_model=FleetCounts)
async def fleet_counts(
    pool: PoolDep,
    _key: DevicesRead,
    tag: TagFilter = [],  # noqa: B006
    parent: Annotated[DeviceId | None, Query(description="Only this gateway's children")] = None,
) -> FleetCounts:
    """How many devices carry the tags (and are behind ``parent``), and how many of them
    are online: the filters of ``GET /v1/devices``, counted in the database."""
    where = device_filter(tag, None, None, first=1)
    if where is None:
        return FleetCounts(total=0, online=0, offline=0)
    conditions, params = where
    row = await pool.fetchrow(sql.count_devices(conditions), *params, parent)
    assert row is not None  # an aggregate's one row
    total, online = int(row["total"]), int(row["online"])
    return FleetCounts(total=total, online=online, offline=total - online)


@router.get("/retention", summary="How far back telemetry reaches", response_model=Retention)
async def retention(request: Request, _key: TelemetryRead) -> Retention:
    """The retention of raw readings and of the minute and hour rollups this API reads
    (``FLEETLINE_STORAGE_*``, read at its start): older readings are not there to chart."""
    kept: dict[str, timedelta] = request.state.retention
    return Retention(
        raw_s=int(kept["telemetry"].total_seconds()),
        minute_rollups_s=int(kept["telemetry_1m"].total_seconds()),
        hour_rollups_s=int(kept["telemetry_1h"].total_seconds()),
    )
