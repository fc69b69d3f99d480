"""Request and response bodies (separate Create, Update and Public models)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
)
from pydantic.config import JsonDict

from fleetline import protocol

# Ids are path segments (topics, REST paths): any of these characters, but not "." or "..".
_PATH_SEGMENT = r"^(?:[A-Za-z0-9_.:-]*[A-Za-z0-9_:-][A-Za-z0-9_.:-]*|\.{3,})$"
DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_PATH_SEGMENT)]
ModuleId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_PATH_SEGMENT)]
# A series: a device's metric, or a module's as "{module_id}/{metric}".
MetricName = Annotated[str, StringConstraints(pattern=protocol.SERIES_NAME_PATTERN)]
# An RFC 3339 time with its offset (`Z` or `+01:00`).
Rfc3339 = Annotated[
    str,
    StringConstraints(
        pattern=r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:\d{2})$"
    ),
]
# Tags are a flat JSON object: names like metric names, short printable strings, numbers
# or booleans as values.
TagName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
TagText = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]
# Strict: a string of digits is text, not a number.
TagValue = TagText | StrictInt | Annotated[StrictFloat, AllowInfNan(False)] | StrictBool
MAX_TAGS = 64
Tags = dict[TagName, TagValue]


# A tag name outside the pattern is refused: say so in the schema too.
NAMED_KEYS_ONLY: JsonDict = {"additionalProperties": False}


# SHA-256 of a certificate's DER: 64 hex digits, colons allowed.
Thumbprint = Annotated[str, StringConstraints(pattern=r"^(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")]
AuthType = Literal["key", "x509_self_signed", "x509_ca"]


class KeyAuth(BaseModel):
    """The device logs in with its key or a SAS token signed with it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"type": "key"}]})
    type: Literal["key"]


class SelfSignedAuth(BaseModel):
    """The device logs in with a client certificate whose thumbprint is one of these
    (a secondary for rotation)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "type": "x509_self_signed",
                    "primary_thumbprint": "3f" * 32,
                    "secondary_thumbprint": None,
                }
            ]
        },
    )
    type: Literal["x509_self_signed"]
    primary_thumbprint: Thumbprint
    secondary_thumbprint: Thumbprint | None = None


class CaAuth(BaseModel):
    """The device logs in with a client certificate whose common name is its id, signed
    by its CA (``ca``, verified: ``/v1/cas``)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"type": "x509_ca", "ca": "factory-ca"}]}
    )
    type: Literal["x509_ca"]
    ca: DeviceId = Field(description="The CA that signs its certificate")


DeviceAuth = Annotated[KeyAuth | SelfSignedAuth | CaAuth, Field(discriminator="type")]


class DeviceAuthPublic(BaseModel):
    type: AuthType
    primary_thumbprint: str | None = Field(description="Lower-case hex")
    secondary_thumbprint: str | None
    ca: str | None = Field(description="x509_ca: the CA that signs its certificate")


def whole_number(value: Any) -> Any:
    """JSON Schema's integer: a number with no fraction (60.0 is one); not a string or a
    boolean, which pydantic's lax mode would take."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


# An integer field that takes 60 and 60.0 but not "60" or true.
WHOLE_NUMBER = BeforeValidator(whole_number)
WholeNumber = Annotated[int, WHOLE_NUMBER]


# A PostgreSQL regular expression that a whole id must match.
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class GatewayPolicy(BaseModel):
    """A gateway's policy for a child id it publishes for that the registry does not
    know yet (docs/gateways.md)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "create_children": True,
                    "child_id_pattern": "gw-7-.*",
                    "child_tags": {"site": "B"},
                    "max_children": 50,
                }
            ]
        },
    )

    create_children: StrictBool = Field(
        default=False,
        description="Register it as the gateway's child on its first message (else refuse it)",
    )
    child_id_pattern: Pattern = Field(
        default=".*",
        description="PostgreSQL regular expression the whole id of a child it creates must "
        "match; required with create_children",
    )
    child_tags: Tags = Field(
        default_factory=dict,
        max_length=MAX_TAGS,
        json_schema_extra=NAMED_KEYS_ONLY,
        description="The tags a child it creates starts with",
    )
    max_children: WholeNumber = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="It creates no child once it has this many",
    )


GATEWAY_FIELD = Field(
    default=None,
    description="A gateway's policy for its children; null: not a gateway",
)
PARENT_FIELD = Field(
    default=None,
    description="The gateway this device is behind (its messages travel through the "
    "gateway's connection); null: none",
)


class DeviceCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"id": "fridge-1", "tags": {"site": "A", "floor": 2}},
                {
                    "id": "gw-7",
                    "tags": {"site": "B"},
                    "gateway": {
                        "create_children": True,
                        "child_id_pattern": "gw-7-.*",
                        "max_children": 50,
                    },
                },
                {
                    "id": "pump-3",
                    "auth": {
                        "type": "x509_self_signed",
                        "primary_thumbprint": "3f" * 32,
                    },
                    "issue_key": False,
                },
            ]
        },
    )

    id: DeviceId
    tags: Tags = Field(default_factory=dict, max_length=MAX_TAGS, json_schema_extra=NAMED_KEYS_ONLY)
    auth: DeviceAuth = Field(
        default_factory=lambda: KeyAuth(type="key"), description="Default: a key"
    )
    enabled: StrictBool = True
    issue_key: StrictBool = Field(
        default=True,
        description="A key device: issue its key now. False for a child that only speaks "
        "through its gateway (POST /key issues one later)",
    )
    gateway: GatewayPolicy | None = GATEWAY_FIELD
    parent: DeviceId | None = PARENT_FIELD


class DeviceUpdate(BaseModel):
    """A JSON merge patch of the tags (a null value removes that tag), and whether the
    device may connect (a disabled device is refused and disconnected)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"tags": {"site": "B", "floor": None}, "enabled": True}]},
    )

    tags: (
        Annotated[
            dict[TagName, TagValue | None],
            Field(max_length=MAX_TAGS, json_schema_extra=NAMED_KEYS_ONLY),
        ]
        | None
    ) = None
    enabled: StrictBool | None = None
    gateway: GatewayPolicy | None = Field(
        default=None, description="Make it a gateway, or change its policy; null: no longer one"
    )
    parent: DeviceId | None = Field(
        default=None,
        description="Move it behind this gateway (at once); null: behind none",
    )


DEVICE_EXAMPLE: dict[str, Any] = {
    "id": "fridge-1",
    "tags": {"site": "A", "floor": 2},
    "online": True,
    "last_seen": "2026-11-25T14:25:45.049Z",
    "status_changed_at": "2026-11-25T14:25:45.049Z",
    "created_at": "2026-11-25T14:25:45.049Z",
    "key_version": 1,
    "key_created_at": "2026-11-25T14:25:45.049Z",
    "enabled": True,
    "auth": {
        "type": "key",
        "primary_thumbprint": None,
        "secondary_thumbprint": None,
        "ca": None,
    },
    "gateway": None,
    "parent": None,
    "offline_reason": None,
}


class DevicePublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [DEVICE_EXAMPLE]})
    id: str
    tags: dict[str, Any]
    online: bool
    last_seen: datetime | None
    status_changed_at: datetime | None
    created_at: datetime
    key_version: int = Field(description="0: no key issued yet (the device cannot connect)")
    key_created_at: datetime | None
    enabled: bool
    auth: DeviceAuthPublic
    gateway: GatewayPolicy | None = Field(description="null: not a gateway")
    parent: str | None = Field(description="The gateway it is behind")
    offline_reason: str | None = Field(
        description="Why it is offline when it did not say so itself (its gateway went offline)"
    )


class GatewayRefusal(BaseModel):
    """What the broker refused a gateway for one child: the latest reason and topic."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "child_id": "pump-9",
                    "reason": "'pump-9' is outside the child id pattern of 'gw-7'",
                    "topic": "devices/pump-9/telemetry",
                    "count": 3,
                    "first_refused_at": "2026-11-25T14:25:45.049Z",
                    "last_refused_at": "2026-11-25T14:31:02.310Z",
                }
            ]
        }
    )
    child_id: str
    reason: str
    topic: str
    count: int = Field(description="Publishes and subscriptions refused")
    first_refused_at: datetime
    last_refused_at: datetime


CREDENTIALS_EXAMPLE: dict[str, Any] = {
    "device_id": "fridge-1",
    "key": "q" * 43 + "=",
    "key_version": 1,
    "connection_string": "HostName=mqtt.example.org;Port=8883;"
    "DeviceId=fridge-1;SharedAccessKey=" + "q" * 43 + "=",
}


class DeviceCredentials(BaseModel):
    """The device's key, shown this once: fleetline keeps only its fingerprint."""

    model_config = ConfigDict(json_schema_extra={"examples": [CREDENTIALS_EXAMPLE]})
    device_id: str
    key: str = Field(description="Base64 symmetric key; the MQTT password, or signs tokens")
    key_version: int
    connection_string: str = Field(
        description="HostName=...;Port=...;DeviceId=...;SharedAccessKey=..."
    )


class DeviceCreated(DevicePublic):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    # Just registered: never seen yet.
                    **DEVICE_EXAMPLE,
                    "online": False,
                    "last_seen": None,
                    "status_changed_at": None,
                    "credentials": CREDENTIALS_EXAMPLE,
                }
            ]
        }
    )
    credentials: DeviceCredentials | None = Field(
        description="The key of a device that logs in with one (null for X.509 devices)"
    )


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ttl_s": 3600}]})

    ttl_s: WholeNumber = Field(default=3600, ge=1, le=366 * 24 * 3600)


class DeviceToken(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device_id": "fridge-1",
                    "token": "sig=" + "Xk" * 21 + "w=&se=1795620345",
                    "expires_at": "2026-11-25T15:25:45Z",
                }
            ]
        }
    )
    device_id: str
    token: str = Field(description="MQTT password: sig=<base64 hmac>&se=<expiry>")
    expires_at: datetime


class DevicePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [DEVICE_EXAMPLE],
                    "next_cursor": "ZnJpZGdlLTE",
                }
            ]
        }
    )
    items: list[DevicePublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


# The example device's latest temperature (a metric's value at its time).
TEMPERATURE_EXAMPLE: dict[str, Any] = {
    "ts": "2026-11-25T14:25:45.049Z",
    "value": 4.5,
    "value_text": None,
}


class MetricValue(BaseModel):
    ts: datetime
    value: float | None
    value_text: str | None


class Latest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device_id": "fridge-1",
                    "metrics": {
                        "temperature": TEMPERATURE_EXAMPLE,
                        "door": {
                            "ts": "2026-11-25T14:25:45.049Z",
                            "value": None,
                            "value_text": "closed",
                        },
                    },
                }
            ]
        }
    )
    device_id: str
    metrics: dict[str, MetricValue]


class Point(BaseModel):
    ts: datetime
    metric: str
    value: float | None
    value_text: str | None


class PointPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [{**TEMPERATURE_EXAMPLE, "metric": "temperature"}],
                    "next_cursor": None,
                }
            ]
        }
    )
    items: list[Point]
    next_cursor: str | None


class Bucket(BaseModel):
    bucket: datetime
    metric: str
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    count: int | None = None
    last: float | None = None


class Aggregates(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    # bucket=5m over whole minutes: read from the minute rollups.
                    "bucket_seconds": 300.0,
                    "source": "telemetry_1m",
                    "items": [
                        {
                            "bucket": "2026-11-25T14:25:00Z",
                            "metric": "temperature",
                            "avg": 4.6,
                            "min": 4.5,
                            "max": 4.8,
                            "count": 5,
                            "last": 4.5,
                        }
                    ],
                }
            ]
        }
    )
    bucket_seconds: float
    source: Literal["telemetry", "telemetry_1m", "telemetry_1h"] = Field(
        description="Raw rows, or the minute or hour rollups (the same numbers)"
    )
    items: list[Bucket]


class DeviceValue(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"device_id": "fridge-1", **TEMPERATURE_EXAMPLE}]}
    )
    device_id: str
    ts: datetime
    value: float | None
    value_text: str | None


DEAD_LETTER_EXAMPLE: dict[str, Any] = {
    "id": 311,
    "received_at": "2026-11-25T14:25:45.049Z",
    "topic": "devices/fridge-1/telemetry",
    "device_id": "fridge-1",
    "reason": "not JSON: unexpected character, expected a string key: line 1 column 2 (char 1)",
    "payload_text": "{temperature: 4.5}",
    "payload_size": 18,
}


class DeadLetter(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [DEAD_LETTER_EXAMPLE]})
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    reason: str
    payload_text: str = Field(description="The payload as UTF-8 (bad bytes replaced), cut")
    payload_size: int


class DeadLetterPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [DEAD_LETTER_EXAMPLE], "next_cursor": "311"}]}
    )
    items: list[DeadLetter]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class FleetLatest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "metric": "temperature",
                    "items": [{"device_id": "fridge-1", **TEMPERATURE_EXAMPLE}],
                    "next_cursor": "fridge-1",
                }
            ]
        }
    )
    metric: str
    items: list[DeviceValue]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


MODULE_EXAMPLE: dict[str, Any] = {
    "device_id": "fridge-1",
    "module_id": "compressor",
    "created_at": "2026-11-25T14:25:45.049Z",
}


class ModulePublic(BaseModel):
    """A module of a device: a named part of its software with its own twin and methods,
    speaking over the device's connection under devices/{id}/modules/{module_id}/."""

    model_config = ConfigDict(json_schema_extra={"examples": [MODULE_EXAMPLE]})
    device_id: str
    module_id: str
    created_at: datetime


class ModuleList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [MODULE_EXAMPLE]}]})
    items: list[ModulePublic] = Field(description="The device's modules, ordered by id")
