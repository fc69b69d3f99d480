"""Request and response bodies of /v1/rules and /v1/alarms (docs/protocol.md, section 15).

A rule is a threshold rule (``metric``, ``raise``, optional ``clear``) or a ``no_data``
rule (``{"kind": "no_data", "timeout_s": 120}``); ``kind`` may be left out of a
threshold rule, as docs/protocol.md shows it. Conditions are one of two shapes: a comparison
with a ``value``, or ``outside`` with ``low``/``high``, so the OpenAPI document says which
fields each needs. Secrets (webhook ``secret``, Pushsafer ``key``) are write-only: every
response shows them as ``********``; sending that mask back in a PUT keeps the stored one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StringConstraints,
    Tag,
)

from fleetline_api.schemas.common import MAX_TAGS, DeviceId, MetricName, Tags

MASK = "********"
# Action fields that hold secrets: shown as MASK once set.
SECRET_FIELDS = ("secret", "key")


def masked(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``actions`` with their secrets replaced by :data:`MASK`."""
    return [{k: (MASK if k in SECRET_FIELDS and v else v) for k, v in a.items()} for a in actions]


MAX_SECONDS = 30 * 86_400
MAX_ACTIONS = 10
MAX_MATCH_DEVICES = 1000

# Finite numbers of a sane magnitude (readings are bounded the same way).
Number = Annotated[float, Field(ge=-1e100, le=1e100)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Template = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
Secret = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Url = Annotated[str, StringConstraints(max_length=2000, pattern=r"^https?://[^\x00-\x20\x7f]+$")]
MethodName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
Severity = Literal["critical", "major", "minor", "warning", "info"]
AlarmState = Literal["active", "acknowledged", "cleared"]
Trigger = Literal["raised", "cleared"]
Triggers = Annotated[
    list[Trigger],
    Field(
        min_length=1,
        max_length=2,
        description="Alarm moves that run the action (default: raised)",
    ),
]


class _Body(BaseModel):
    # Strict: "1" is not a number and 0 is not false (the OpenAPI types say so).
    model_config = ConfigDict(extra="forbid", strict=True)


class Comparison(_Body):
    """``value`` compared with ``op``; ``rate>`` compares the change per second."""

    op: Literal[">", ">=", "<", "<=", "==", "!=", "rate>"]
    value: Number
    for_s: Seconds = Field(default=0, description="How long it must hold (seconds)")


class Outside(_Body):
    """True when the value is below ``low`` or above ``high``."""

    op: Literal["outside"]
    low: Number
    high: Number
    for_s: Seconds = Field(default=0, description="How long it must hold (seconds)")


Condition = Annotated[Comparison | Outside, Field(discriminator="op")]


class Match(_Body):
    """Devices listed, or carrying every tag given (either suffices); empty: all devices."""

    devices: list[DeviceId] = Field(default_factory=list, max_length=MAX_MATCH_DEVICES)
    tags: Tags = Field(
        default_factory=dict, max_length=MAX_TAGS, json_schema_extra={"additionalProperties": False}
    )


class WebhookAction(_Body):
    """JSON POST of ``{"event", "alarm", "rule"}``; with a secret, the header
    ``X-Fleetline-Signature: sha256=<hex HMAC-SHA256 of the body>``."""

    type: Literal["webhook"]
    url: Url
    secret: Secret | None = Field(default=None, description="Write-only; shown masked")
    on: Triggers = ["raised"]


class PushsaferAction(_Body):
    """A Pushsafer notification (form fields k, d, t, m)."""

    type: Literal["pushsafer"]
    key: Secret = Field(description="The Pushsafer private or alias key; write-only")
    device: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = Field(
        default="a", description="Pushsafer device or group id; a: all devices"
    )
    title: Name | None = None
    on: Triggers = ["raised"]


class CommandAction(_Body):
    """Invoke a method on a device: ``{"method", "params"}`` published to
    ``devices/{device_id}/methods/{request_id}/req`` (QoS 1), at most one command per
    target device per rate-limit interval."""

    type: Literal["command"]
    device_id: DeviceId | None = Field(default=None, description="Default: the alarm's device")
    method: MethodName
    params: dict[str, Any] = Field(default_factory=dict)
    on: Triggers = ["raised"]


Action = Annotated[WebhookAction | PushsaferAction | CommandAction, Field(discriminator="type")]


class _RuleCommon(_Body):
    name: Name
    match: Match = Field(default_factory=Match)
    severity: Severity = "major"
    message: Template = Field(
        default="",
        description="With {device_id}, {value}, {peak}, {count}, {rule}, {metric}, {severity}",
    )
    actions: list[Action] = Field(default_factory=list, max_length=MAX_ACTIONS)
    enabled: bool = True


class ThresholdRule(_RuleCommon):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "fridge too warm",
                    "kind": "threshold",
                    "metric": "temperature",
                    "match": {"tags": {"site": "A"}},
                    "raise": {"op": ">", "value": 8, "for_s": 300},
                    "clear": {"op": "<", "value": 6},
                    "severity": "major",
                    "message": "{device_id}: {value} °C",
                }
            ]
        }
    )
    kind: Literal["threshold"] = "threshold"
    metric: MetricName
    raise_: Condition = Field(alias="raise")
    clear: Condition | None = Field(
        default=None,
        description="Hysteresis and clear delay; default: the raise condition no longer holds",
    )


class NoDataRule(_RuleCommon):
    """Offline detection: no reading for ``timeout_s``, or an ``offline`` status."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "silent for 10 minutes",
                    "kind": "no_data",
                    "timeout_s": 600,
                    "severity": "warning",
                }
            ]
        }
    )

    kind: Literal["no_data"]
    timeout_s: Annotated[StrictFloat, Field(gt=0, le=MAX_SECONDS)]


def _rule_kind(doc: Any) -> str | None:
    if isinstance(doc, dict):
        kind = doc.get("kind", "threshold")
        return kind if isinstance(kind, str) else None
    if isinstance(doc, BaseModel):
        return str(getattr(doc, "kind", None))
    return None


RuleIn = Annotated[
    Annotated[ThresholdRule, Tag("threshold")] | Annotated[NoDataRule, Tag("no_data")],
    Discriminator(_rule_kind),
]


RULE_EXAMPLE: dict[str, Any] = {
    "id": 7,
    "name": "fridge too warm",
    "kind": "threshold",
    "match": {"devices": [], "tags": {"site": "A"}},
    "metric": "temperature",
    "raise": {"op": ">", "value": 8, "for_s": 300},
    "clear": {"op": "<", "value": 6, "for_s": 0},
    "timeout_s": None,
    "severity": "major",
    "message": "{device_id}: {value} °C",
    "actions": [
        {
            "type": "webhook",
            "url": "https://hooks.example.org/alarms",
            "secret": "********",
            "on": ["raised"],
        }
    ],
    "enabled": True,
    "version": 2,
    "created_at": "2026-11-25T14:25:45.049Z",
    "updated_at": "2026-11-25T14:31:02.310Z",
}


class RulePublic(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={"examples": [RULE_EXAMPLE]},
    )

    id: int
    name: str
    kind: Literal["threshold", "no_data"]
    match: dict[str, Any]
    metric: str | None
    raise_: dict[str, Any] | None = Field(alias="raise")
    clear: dict[str, Any] | None
    timeout_s: float | None
    severity: str
    message: str
    actions: list[dict[str, Any]] = Field(description="Secrets and keys shown as ********")
    enabled: bool
    version: int
    created_at: datetime
    updated_at: datetime


class RulePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [RULE_EXAMPLE],
                    "next_cursor": None,
                }
            ]
        }
    )
    items: list[RulePublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


ALARM_EXAMPLE: dict[str, Any] = {
    "id": 41,
    "rule_id": 7,
    "rule_name": "fridge too warm",
    "device_id": "fridge-1",
    "metric": "temperature",
    "severity": "major",
    "state": "acknowledged",
    "raised_at": "2026-11-25T14:25:45.049Z",
    "acknowledged_at": "2026-11-25T14:31:02.310Z",
    "acknowledged_by": "ops dashboard (key k3x9q2mz7d1a)",
    "cleared_at": None,
    "cleared_by": None,
    "value": 9.1,
    "peak": 9.8,
    "count": 14,
    "message": "fridge-1: 9.1 °C",
    "updated_at": "2026-11-25T14:31:02.310Z",
}


class AlarmPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ALARM_EXAMPLE]})
    id: int
    rule_id: int
    rule_name: str
    device_id: str
    metric: str | None
    severity: str
    state: AlarmState
    raised_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    cleared_at: datetime | None
    cleared_by: str | None
    value: float | None = Field(description="The latest value")
    peak: float | None = Field(description="The most extreme value while open")
    count: int = Field(description="Readings that met the raise condition while open")
    message: str
    updated_at: datetime


class AlarmPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [ALARM_EXAMPLE],
                    "next_cursor": None,
                }
            ]
        }
    )
    items: list[AlarmPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class AlarmEvent(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "at": ALARM_EXAMPLE["acknowledged_at"],
                    "event": "acknowledged",
                    "actor": ALARM_EXAMPLE["acknowledged_by"],
                    "value": ALARM_EXAMPLE["value"],
                }
            ]
        }
    )
    at: datetime
    event: Literal["raised", "acknowledged", "cleared"]
    actor: str | None = Field(description="rules, or the API key that moved it")
    value: float | None


class Delivery(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    # The example rule's webhook, run when the example alarm was raised.
                    "id": 93,
                    "event": "raised",
                    "action_index": 0,
                    "action_type": "webhook",
                    "action": RULE_EXAMPLE["actions"][0],
                    "target": None,
                    "status": "delivered",
                    "attempts": 1,
                    "next_attempt_at": ALARM_EXAMPLE["raised_at"],
                    "last_error": None,
                    "response_status": 200,
                    "created_at": ALARM_EXAMPLE["raised_at"],
                    "delivered_at": "2026-11-25T14:25:45.312Z",
                }
            ]
        }
    )
    id: int
    event: Trigger
    action_index: int
    action_type: Literal["webhook", "pushsafer", "command"]
    action: dict[str, Any] = Field(description="The action (secrets masked)")
    target: str | None
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    response_status: int | None
    created_at: datetime
    delivered_at: datetime | None


class BacktestAlarm(BaseModel):
    device_id: str
    raised_at: datetime
    cleared_at: datetime | None
    value: float | None
    peak: float | None
    count: int
    message: str


class Backtest(BaseModel):
    rule_id: int
    from_: datetime = Field(alias="from")
    to: datetime
    readings: int = Field(description="Readings replayed")
    alarms: list[BacktestAlarm]

    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    # The example rule over a day: the example alarm, had it been live.
                    "rule_id": RULE_EXAMPLE["id"],
                    "from": "2026-11-24T15:00:00Z",
                    "to": "2026-11-25T15:00:00Z",
                    "readings": 1440,
                    "alarms": [
                        {
                            "device_id": ALARM_EXAMPLE["device_id"],
                            "raised_at": ALARM_EXAMPLE["raised_at"],
                            "cleared_at": "2026-11-25T14:52:10.000Z",
                            "value": 5.8,
                            "peak": ALARM_EXAMPLE["peak"],
                            "count": 27,
                            "message": ALARM_EXAMPLE["message"],
                        }
                    ],
                }
            ]
        },
    )
