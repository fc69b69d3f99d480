"""Bodies of ``/v1/jobs``: a method, a desired-properties patch or a firmware rollout
(schemas/rollouts.py) for every device a device query matches, its progress and each
device's outcome."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, WithJsonSchema, field_validator

from fleetline import devicequery
from fleetline_api.schemas.common import WholeNumber
from fleetline_api.schemas.methods import MethodCall, MethodName
from fleetline_api.schemas.query import QUERY_DESCRIPTION
from fleetline_api.schemas.rollouts import RolloutOptions, RolloutPublic
from fleetline_api.schemas.twins import DESIRED_PATCH_SCHEMA, TwinDocument

JobType = Literal["method", "twin", "rollout"]
JobState = Literal["queued", "running", "paused", "completed", "cancelled", "failed"]
DeviceState = Literal["pending", "running", "succeeded", "failed", "rolled_back", "cancelled"]
DEVICE_STATES: tuple[DeviceState, ...] = (
    "pending",
    "running",
    "succeeded",
    "failed",
    "rolled_back",
    "cancelled",
)
FINAL_STATES = frozenset(DEVICE_STATES) - {"pending", "running"}
MAX_BATCH_SIZE = 1000
MAX_PER_SECOND = 10_000
# One device in about 17 minutes: the slowest pace a job may take.
MIN_PER_SECOND = 0.001


class MethodSpec(MethodCall):
    """The method each device is called with, as ``POST /v1/devices/{id}/methods/{name}``
    takes it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "reboot", "params": {"delay_s": 10}, "timeout_s": 30}]
        }
    )

    name: MethodName = Field(description="The method's name, as the devices know it")


class TwinSpec(BaseModel):
    """What a twin job stores: the patch merged into each device's desired properties."""

    patch: dict[str, Any]


class _JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(
        max_length=devicequery.MAX_QUERY_LENGTH,
        description=QUERY_DESCRIPTION + ". Evaluated once, when the job is created",
    )
    batch_size: WholeNumber = Field(
        default=10,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="At most this many of the job's devices run at once",
    )
    max_per_second: StrictFloat | None = Field(
        default=None,
        ge=MIN_PER_SECOND,
        le=MAX_PER_SECOND,
        allow_inf_nan=False,
        description="At most this many devices started per second; none: no limit",
    )


class MethodJobCreate(_JobCreate):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "method",
                    "query": "tags.site = 'A'",
                    "method": {"name": "reboot", "params": {"delay_s": 10}, "timeout_s": 30},
                    "batch_size": 10,
                    "max_per_second": 5,
                }
            ]
        }
    )
    type: Literal["method"]
    method: MethodSpec


def _plain_json(patch: dict[str, Any]) -> dict[str, Any]:
    """The patch as the twin route would have parsed it (orjson): no NaN or infinity,
    integers beyond 64 bits as floats."""
    try:
        normal: dict[str, Any] = orjson.loads(json.dumps(patch, allow_nan=False))
    except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise ValueError(f"the patch is not plain JSON: {exc}") from None
    return normal


class TwinJobCreate(_JobCreate):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "twin",
                    "query": "tags.site = 'A'",
                    "patch": {"interval_s": 30},
                    "batch_size": 50,
                }
            ]
        }
    )
    type: Literal["twin"]
    patch: Annotated[dict[str, Any], WithJsonSchema(DESIRED_PATCH_SCHEMA)] = Field(
        description="Merged into each device's desired properties, as "
        "PATCH /v1/devices/{id}/twin does; the whole document is then published, retained"
    )

    @field_validator("patch")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _plain_json(value)


class RolloutJobCreate(_JobCreate, RolloutOptions):
    """A firmware rollout: ``batch_size`` devices at most updating at once."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "rollout",
                    "firmware_id": 1,
                    "query": "tags.model = 'esp32'",
                    "canary": 2,
                    "wave_size": 50,
                    "failure_threshold_percent": 10,
                    "on_failure": "pause",
                    "window": {"start": "01:00", "end": "05:00"},
                }
            ]
        }
    )

    type: Literal["rollout"]


JobCreate = Annotated[
    MethodJobCreate | TwinJobCreate | RolloutJobCreate, Field(discriminator="type")
]


class JobProgress(BaseModel):
    total: int = Field(description="Devices the query matched when the job was created")
    pending: int
    running: int
    succeeded: int
    failed: int
    rolled_back: int = Field(description="A rollout's devices that went back to their version")
    cancelled: int
    percent: float = Field(description="Devices finished (in any way) of the total, 0-100")


JOB_EXAMPLE: dict[str, Any] = {
    "id": 12,
    "type": "method",
    "query": "tags.site = 'A'",
    "method": {"name": "reboot", "params": {"delay_s": 10}, "timeout_s": 30},
    "patch": None,
    "rollout": None,
    "batch_size": 10,
    "max_per_second": 5.0,
    "state": "running",
    "progress": {
        "total": 40,
        "pending": 22,
        "running": 10,
        "succeeded": 7,
        "failed": 1,
        "rolled_back": 0,
        "cancelled": 0,
        "percent": 20.0,
    },
    "created_at": "2026-11-25T14:25:45.049Z",
    "created_by": "ops dashboard (key k3x9q2mz7d1a)",
    "started_at": "2026-11-25T14:25:45.049Z",
    "cancelled_at": None,
    "cancelled_by": None,
    "paused_at": None,
    "paused_by": None,
    "finished_at": None,
    "error": None,
}


class JobPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})
    id: int
    type: JobType
    query: str
    method: MethodSpec | None = Field(description="A method job's call")
    patch: TwinDocument | None = Field(description="A twin job's patch of desired properties")
    rollout: RolloutPublic | None = Field(description="A rollout's release and options")
    batch_size: int
    max_per_second: float | None
    state: JobState = Field(
        description="queued (nothing started yet), running, paused (no device is started; "
        "those running go on), completed (no device left), cancelled, or failed (the job "
        "could not run, or a rollout aborted at its failure threshold: see error)"
    )
    progress: JobProgress
    created_at: datetime
    created_by: str | None
    started_at: datetime | None
    cancelled_at: datetime | None
    cancelled_by: str | None
    paused_at: datetime | None = Field(description="When it was paused, if it is")
    paused_by: str | None = Field(description="Who paused it (or `failure threshold`)")
    finished_at: datetime | None = Field(description="When no device was left pending or running")
    error: str | None


class JobPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [JOB_EXAMPLE],
                    "next_cursor": None,
                }
            ]
        }
    )
    items: list[JobPublic] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


# A device of the example job that answered its reboot call.
JOB_DEVICE_EXAMPLE: dict[str, Any] = {
    "device_id": "fridge-1",
    "state": "succeeded",
    "attempts": 1,
    "status": 200,
    "reason": "answered",
    "result": {"request_id": "3b9e0d7c51a84f2e9c6d0a1b7e4f5c28", "payload": {"rebooting_in_s": 10}},
    "error": None,
    "started_at": "2026-11-25T14:25:45.049Z",
    "finished_at": "2026-11-25T14:25:45.612Z",
    "wave": 0,
    "phase": None,
    "phase_at": None,
    "progress": None,
    "refused_reports": 0,
    "refused_report": None,
}


class JobDevicePublic(BaseModel):
    """One device's part in a job."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_DEVICE_EXAMPLE]})
    device_id: str
    state: DeviceState
    attempts: int = Field(description="Times the device was started (a restart may add one)")
    status: int | None = Field(
        description="A method job: the device's own status when it answered; otherwise the "
        "HTTP status of the outcome (409 offline, 504 no answer, 404 device deleted, 503 "
        "interrupted...)"
    )
    reason: str | None = Field(
        description="The outcome in a word: answered, applied, offline, timeout, malformed, "
        "not_found, unavailable, unpublished, too_large, abandoned, interrupted (the API "
        "stopped after sending), error, cancelled; a rollout device: notified, then its "
        "own reason for failing or rolling back, or timeout"
    )
    result: Any = Field(
        description='A method: {"request_id", "payload"} (the device\'s answer); a twin '
        'patch: {"version", "published"}'
    )
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    wave: int = Field(description="Waves start in order (0 for a method or twin job)")
    phase: str | None = Field(
        description="A rollout device once notified: notified, downloading, verifying, "
        "applying, rebooting, then its final state"
    )
    phase_at: datetime | None = Field(description="Since when it is in that phase")
    progress: int | None = Field(description="Downloading: percent of the image received")
    refused_reports: int = Field(
        description="A rollout device's reports that could not be taken (an unknown state, "
        "a step back, success on another version)"
    )
    refused_report: str | None = Field(description="Why the last one was refused")


class JobDevicePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [JOB_DEVICE_EXAMPLE], "next_cursor": None}]}
    )
    items: list[JobDevicePublic] = Field(description="Ordered by device id")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
