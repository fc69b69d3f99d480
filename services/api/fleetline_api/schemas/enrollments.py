"""Enrollments and registrations (routes/enrollments.py, routes/provision.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fleetline_api.schemas.common import (
    MAX_TAGS,
    NAMED_KEYS_ONLY,
    DeviceId,
    Pattern,
    Tags,
    Thumbprint,
)

Desired = Annotated[dict[str, Any], Field(description="Initial desired twin properties")]


ENROLLMENT_CREATE_EXAMPLE: dict[str, Any] = {
    "id": "factory-line-1",
    "kind": "group",
    "attestation": "symmetric_key",
    "registration_pattern": "sensor-[0-9]+",
    "initial_tags": {"site": "A"},
    "initial_desired": {"interval_s": 60},
}


class EnrollmentCreate(BaseModel):
    """``group``: any registration id the pattern allows; ``individual``: one device
    whose registration id is the enrollment's id. ``symmetric_key`` attestation issues the
    enrollment key (in this response only); ``x509`` needs ``ca`` (a verified CA, for a
    group) or ``thumbprint`` (the device's certificate, for an individual enrollment)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [ENROLLMENT_CREATE_EXAMPLE]}
    )

    id: DeviceId
    kind: Literal["group", "individual"]
    attestation: Literal["symmetric_key", "x509"]
    ca: DeviceId | None = Field(default=None, description="x509 groups: the CA's name")
    thumbprint: Thumbprint | None = Field(
        default=None, description="x509 individual enrollments: the certificate's SHA-256"
    )
    registration_pattern: Pattern = Field(
        default=".*",
        description="PostgreSQL regular expression the whole registration id must match",
    )
    initial_tags: Tags = Field(
        default_factory=dict, max_length=MAX_TAGS, json_schema_extra=NAMED_KEYS_ONLY
    )
    initial_desired: Desired = Field(default_factory=dict)
    reprovision: Literal["keep", "reset"] = Field(
        default="keep",
        description="A device that provisions again keeps its tags and desired twin, or "
        "gets the initial ones back",
    )
    enabled: StrictBool = True


class EnrollmentUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"enabled": False},
                {"initial_tags": {"site": "B"}, "reprovision": "reset"},
            ]
        },
    )

    registration_pattern: Pattern | None = None
    initial_tags: (
        Annotated[Tags, Field(max_length=MAX_TAGS, json_schema_extra=NAMED_KEYS_ONLY)] | None
    ) = None
    initial_desired: Desired | None = None
    reprovision: Literal["keep", "reset"] | None = None
    enabled: StrictBool | None = Field(
        default=None, description="A disabled enrollment refuses registrations"
    )


# The enrollment above, as stored, after some registrations.
ENROLLMENT_EXAMPLE: dict[str, Any] = {
    **ENROLLMENT_CREATE_EXAMPLE,
    "ca_name": None,
    "thumbprint": None,
    "reprovision": "keep",
    "enabled": True,
    "key_version": 1,
    "registrations": 42,
    "created_at": "2026-11-25T14:25:45.049Z",
    "updated_at": "2026-11-25T14:25:45.049Z",
}


class EnrollmentPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ENROLLMENT_EXAMPLE]})
    id: str
    kind: str
    attestation: str
    ca_name: str | None
    thumbprint: str | None
    registration_pattern: str
    initial_tags: dict[str, Any]
    initial_desired: dict[str, Any]
    reprovision: str
    enabled: bool
    key_version: int
    registrations: int = Field(description="Devices it provisioned")
    created_at: datetime
    updated_at: datetime


class EnrollmentCreated(EnrollmentPublic):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**ENROLLMENT_EXAMPLE, "registrations": 0, "key": "Zm" * 21 + "w="}]
        }
    )
    key: str | None = Field(
        description="symmetric_key: the enrollment key, shown this once. A group's device "
        "proves base64(HMAC-SHA256(key, registration id)); an individual one the key"
    )


class EnrollmentList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [ENROLLMENT_EXAMPLE]}]})
    items: list[EnrollmentPublic]


# A device of the enrollment above that registered (the device id is the registration id).
REGISTRATION_EXAMPLE: dict[str, Any] = {
    "registration_id": "sensor-0042",
    "device_id": "sensor-0042",
    "status": "assigned",
    "error": None,
    "attempts": 1,
    "operation_id": "0f8d3b52-6c1e-4a9f-b7d2-5e3a9c1f4b60",
    "created_at": "2026-11-25T14:25:45.049Z",
    "updated_at": "2026-11-25T14:25:45.049Z",
}


class RegistrationPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [REGISTRATION_EXAMPLE]})
    registration_id: str
    device_id: str | None
    status: str
    error: str | None
    attempts: int
    operation_id: UUID
    created_at: datetime
    updated_at: datetime


class RegistrationPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [REGISTRATION_EXAMPLE], "next_cursor": None}]}
    )
    items: list[RegistrationPublic]
    next_cursor: str | None


PROVISION_EXAMPLE: dict[str, Any] = {
    "enrollment_id": "factory-line-1",
    "registration_id": "sensor-0042",
}


class ProvisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [PROVISION_EXAMPLE]})

    enrollment_id: DeviceId
    registration_id: DeviceId


class ProvisionAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **PROVISION_EXAMPLE,
                    "status": "assigned",
                    "operation_id": REGISTRATION_EXAMPLE["operation_id"],
                    "device_id": REGISTRATION_EXAMPLE["device_id"],
                    "auth": {"type": "key", "key": "q" * 43 + "=", "key_version": 1},
                    "mqtt_url": "mqtts://mqtt.example.org:8883",
                    "error": None,
                    "retry_after_s": None,
                }
            ]
        }
    )
    status: Literal["assigned", "failed", "throttled"]
    enrollment_id: str
    registration_id: str
    operation_id: str | None = None
    device_id: str | None = None
    auth: dict[str, Any] = Field(
        default_factory=dict,
        description='{"type": "key", "key": ..., "key_version": ...} or {"type": "x509_ca"} '
        'or {"type": "x509_self_signed"}',
    )
    mqtt_url: str | None = None
    error: str | None = None
    retry_after_s: int | None = None
