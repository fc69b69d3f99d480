"""Request and response bodies of cloud-to-device messages (``/v1/devices/{id}/messages``).

What the device receives on ``devices/{id}/c2d`` is ``{"id": ..., "body": ...,
"properties": {...}}`` (docs/protocol.md, section 7); it answers on ``devices/{id}/c2d/ack`` with
``{"id": ..., "outcome": "complete" | "reject"}``.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetline.protocol import json_problem
from fleetline_api.schemas.common import WHOLE_NUMBER, TagName, TagText

MessageState = Literal["queued", "sent", "completed", "rejected", "expired", "cancelled"]
PENDING_STATES = ("queued", "sent")
# A message's body, as JSON, and the request that carries it, in bytes.
MAX_BODY_BYTES = 64 * 1024
MAX_REQUEST_BYTES = MAX_BODY_BYTES + 32 * 1024
# Objects and arrays nested deeper than this are refused (the root is level 1).
MAX_BODY_DEPTH = 32
MAX_PROPERTIES = 32
# 48 h: a command older than that is rarely still wanted (IoT Hub's default maximum).
MAX_TTL_SECONDS = 172_800


class BodyError(ValueError):
    """The body cannot be stored or sent as it is (the text says why)."""


class BodyTooLargeError(BodyError):
    pass


def _check(body: Any) -> None:
    """Depth, and strings PostgreSQL's jsonb cannot store (NUL)."""
    problem = json_problem(body, max_depth=MAX_BODY_DEPTH, path="body")
    if problem is None:
        return
    if problem.kind == "too_deep":
        raise BodyError(f"the body is nested more than {MAX_BODY_DEPTH} levels deep")
    if problem.kind == "member_name":
        raise BodyError(f"a member name in {problem.path} contains a NUL character")
    raise BodyError(f"{problem.path} contains a NUL character")


def encode_body(body: Any) -> str:
    """The body as compact JSON text, as it is stored and sent.

    Raises :class:`BodyError` for what JSON or PostgreSQL cannot hold (NaN, infinities,
    NUL characters, lone surrogates, nesting beyond the limit) and
    :class:`BodyTooLargeError` beyond ``MAX_BODY_BYTES``."""
    _check(body)
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text.encode())
    except ValueError as exc:  # NaN or infinity; UnicodeEncodeError: a lone surrogate
        raise BodyError(f"the body cannot be sent as JSON: {exc}") from None
    if size > MAX_BODY_BYTES:
        raise BodyTooLargeError(f"the body is {size} bytes as JSON, more than {MAX_BODY_BYTES}")
    return text


TtlSeconds = Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS), WHOLE_NUMBER]


class MessageCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "body": {"display": "service due"},
                    "properties": {"priority": "high"},
                    "ttl_s": 600,
                }
            ]
        },
    )

    body: Any = Field(
        description=f"Any JSON value, passed to the device as is; at most {MAX_BODY_BYTES} "
        f"bytes as JSON and {MAX_BODY_DEPTH} levels deep"
    )
    properties: dict[TagName, TagText] = Field(
        default_factory=dict,
        max_length=MAX_PROPERTIES,
        description="Application properties the device receives beside the body",
        json_schema_extra={"additionalProperties": False},
    )
    ttl_s: TtlSeconds | None = Field(
        default=None,
        description="Seconds before an undelivered or unacknowledged message expires "
        "(default: the API's FLEETLINE_API_C2D_DEFAULT_TTL_S, 3600)",
    )


class MessageEvent(BaseModel):
    at: datetime
    event: MessageState = Field(description="The state the message entered (sent: each delivery)")
    detail: str | None


MESSAGE_EXAMPLE: dict[str, Any] = {
    "id": "5b0c2f8e-9a41-4c1e-8f07-3d2a6b9e1c55",
    "device_id": "fridge-1",
    "state": "completed",
    "body": {"display": "service due"},
    "properties": {"priority": "high"},
    "created_at": "2026-11-25T14:25:45.049Z",
    "created_by": "ops dashboard (key k3x9q2mz7d1a)",
    "expires_at": "2026-11-25T14:35:45.049Z",
    "sent_at": "2026-11-25T14:25:45.049Z",
    "last_sent_at": "2026-11-25T14:25:45.049Z",
    "deliveries": 1,
    "finished_at": "2026-11-25T14:31:02.310Z",
    "history": [
        {"at": "2026-11-25T14:25:45.049Z", "event": "queued", "detail": None},
        {"at": "2026-11-25T14:25:45.049Z", "event": "sent", "detail": None},
        {"at": "2026-11-25T14:31:02.310Z", "event": "completed", "detail": None},
    ],
}


class MessagePublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MESSAGE_EXAMPLE]})
    id: uuid.UUID = Field(description="The id the device receives and acknowledges")
    device_id: str
    state: MessageState
    body: Any
    properties: dict[str, str]
    created_at: datetime
    created_by: str | None = Field(description="The API key that queued it")
    expires_at: datetime
    sent_at: datetime | None = Field(description="First delivery to the device")
    last_sent_at: datetime | None = Field(description="Latest delivery")
    deliveries: int = Field(description="How many times it was sent")
    finished_at: datetime | None = Field(
        description="When it was completed, rejected, expired or cancelled"
    )
    history: list[MessageEvent] = Field(description="Its moves, oldest first")


class MessagePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [MESSAGE_EXAMPLE], "next_cursor": None}]}
    )
    items: list[MessagePublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
