"""Bodies of a firmware rollout: a job of type ``rollout`` (``/v1/jobs``, docs/ota.md).

A rollout notifies each device of a release through its desired properties (``firmware``)
and follows what the device reports in ``reported.firmware`` through the phases below,
each bounded by a timeout, in waves: a canary wave first, then waves of ``wave_size``.
"""

from __future__ import annotations

from datetime import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StringConstraints, field_validator

from fleetline_api.schemas.common import WholeNumber, whole_number

# The phases of a device being updated, in order; a report may skip ahead, never back.
Phase = Literal["notified", "downloading", "verifying", "applying", "rebooting"]
PHASES: tuple[Phase, ...] = ("notified", "downloading", "verifying", "applying", "rebooting")
# How a device's update ends, as it reports it (or `failed` with reason `timeout`).
Final = Literal["succeeded", "failed", "rolled_back"]
FINALS: tuple[Final, ...] = ("succeeded", "failed", "rolled_back")
DAY_S = 86_400


class PhaseTimeouts(BaseModel):
    """Seconds a device may stay in each phase before it fails with reason ``timeout``."""

    model_config = ConfigDict(extra="forbid")

    notified: WholeNumber = Field(
        default=3600,
        ge=1,
        le=7 * DAY_S,
        description="Until it starts downloading (it may be "
        "offline: it gets the notification when it connects)",
    )
    downloading: WholeNumber = Field(default=3600, ge=1, le=7 * DAY_S)
    verifying: WholeNumber = Field(default=600, ge=1, le=DAY_S)
    applying: WholeNumber = Field(default=600, ge=1, le=DAY_S)
    rebooting: WholeNumber = Field(
        default=600, ge=1, le=DAY_S, description="Until it reports the new version healthy"
    )


HourMinute = Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class Window(BaseModel):
    """Devices are notified only between ``start`` and ``end``, HH:MM in UTC (an ``end``
    before ``start`` spans midnight; the two may not be equal). Devices already updating
    go on outside it."""

    model_config = ConfigDict(extra="forbid")

    start: HourMinute = Field(examples=["01:00"])
    end: HourMinute = Field(examples=["05:00"])

    @property
    def opens(self) -> time:
        return time.fromisoformat(self.start)

    @property
    def closes(self) -> time:
        return time.fromisoformat(self.end)


class RolloutOptions(BaseModel):
    """How a rollout proceeds (beside ``batch_size``: at most this many devices updating
    at once, and ``max_per_second``: notifications per second)."""

    model_config = ConfigDict(extra="forbid")

    # Within what a JSON number holds exactly (a client may send it as a double).
    firmware_id: WholeNumber = Field(
        ge=1, le=2**53 - 1, description="The release to put on the devices"
    )
    canary: WholeNumber = Field(
        default=1,
        ge=0,
        le=100_000,
        description="Devices in the first wave; the next wave starts once every one of them "
        "has finished, and only under the failure threshold",
    )
    canary_percent: StrictFloat | None = Field(
        default=None,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="The first wave as a percentage of the devices (at least one), instead "
        "of `canary`",
    )
    wave_size: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Devices per wave after the canary; none: all the rest in one wave",
    )
    failure_threshold_percent: StrictFloat = Field(
        default=10,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Once at least the canary's count of devices has finished (since the "
        "rollout was last resumed), more failed or rolled-back devices than this "
        "percentage of them stops it",
    )
    on_failure: Literal["pause", "abort"] = Field(
        default="pause",
        description="At the threshold: pause (resume it to go on) or abort (its pending "
        "devices are cancelled; the rollout ends failed)",
    )
    window: Window | None = None
    timeouts: PhaseTimeouts = Field(default_factory=PhaseTimeouts)

    @field_validator("wave_size", mode="before")
    @classmethod
    def _whole_wave(cls, value: object) -> object:
        # As WholeNumber does (beside None, its bounds would not reach the JSON Schema).
        return None if value is None else whole_number(value)


class RolloutSpec(RolloutOptions):
    """What a rollout job stores: its options, the canary as a count, and the release as
    devices are told of it."""

    version: str
    kind: Literal["bundle", "image"]
    size: int
    manifest: str
    signature: str


class RolloutPublic(BaseModel):
    firmware_id: int
    version: str
    kind: str
    canary: int = Field(description="Devices in the first wave")
    wave_size: int | None
    failure_threshold_percent: float
    on_failure: str
    window: Window | None
    timeouts: PhaseTimeouts
    phases: dict[str, int] = Field(
        description="Devices updating now, per phase (notified, downloading, verifying, "
        "applying, rebooting)"
    )


def notification(job_id: int, spec: RolloutSpec) -> dict[str, Any]:
    """The desired-properties patch that tells a device of the rollout's release."""
    return {
        "firmware": {
            "rollout": job_id,
            "id": spec.firmware_id,
            "version": spec.version,
            "kind": spec.kind,
            "size": spec.size,
            "manifest": spec.manifest,
            "signature": spec.signature,
        }
    }
