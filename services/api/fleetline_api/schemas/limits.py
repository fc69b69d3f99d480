"""Per-device limits (routes/limits.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from fleetline.limits import MOST
from fleetline_api.schemas.common import WholeNumber

_LIMITS: dict[str, Any] = {
    "messages_per_second": 20,
    "burst_messages": 1000,
    "bytes_per_second": 65536,
    "burst_bytes": 4194304,
}


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_LIMITS]})

    messages_per_second: StrictFloat = Field(ge=0.001, le=MOST["messages_per_second"])
    burst_messages: WholeNumber = Field(
        ge=1,
        le=MOST["burst_messages"],
        description="Messages a device may send at once (a backlog after an outage)",
    )
    bytes_per_second: StrictFloat = Field(ge=1, le=MOST["bytes_per_second"])
    burst_bytes: WholeNumber = Field(
        ge=1_048_576, le=MOST["burst_bytes"], description="At least the largest packet (1 MiB)"
    )


LIMITS_EXAMPLE: dict[str, Any] = {
    "selector": "tag:site=A",
    **_LIMITS,
    "updated_at": "2026-11-25T14:25:45.049Z",
}


class LimitsPublic(Limits):
    model_config = ConfigDict(json_schema_extra={"examples": [LIMITS_EXAMPLE]})
    selector: str = Field(description="default, device:<id> or tag:<name>=<value>")
    updated_at: datetime


class LimitsList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [LIMITS_EXAMPLE]}]})
    items: list[LimitsPublic]


class Refusals(BaseModel):
    messages: int
    bytes: int
    first_refused_at: datetime
    last_refused_at: datetime


class DeviceLimits(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device_id": "fridge-1",
                    "limits": LIMITS_EXAMPLE,
                    "refused": {
                        "messages": 12,
                        "bytes": 6144,
                        "first_refused_at": "2026-11-25T14:25:45.049Z",
                        "last_refused_at": "2026-11-25T14:25:47.310Z",
                    },
                }
            ]
        }
    )
    device_id: str
    limits: LimitsPublic | None = Field(description="What applies to the device")
    refused: Refusals | None = Field(
        description="Publishes the broker refused for being over the limits (null: none)"
    )
