"""Bodies of the twin routes (``/v1/devices/{id}/twin``).

The PATCH body is a JSON merge patch (RFC 7396) read from the raw request, so that its
size is checked before it is parsed; ``DESIRED_PATCH_SCHEMA`` documents it in OpenAPI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
)
from typing_extensions import TypeAliasType

from fleetline.protocol import MAX_TWIN_BYTES, MAX_TWIN_DEPTH, TWIN_KEY_RE

MERGE_PATCH_MEDIA_TYPE = "application/merge-patch+json"
_MEMBER_PATTERN = "^" + TWIN_KEY_RE.pattern.removesuffix(r"\Z") + "$"

# A value in a twin document, as OpenAPI states it (one named, recursive schema; the
# depth limit is checked by the API, JSON Schema cannot say it without spelling out
# every level). Strict: true is not 1.
# Responses are not validated against it (SkipValidation): the documents were checked on
# the way in, by the API or by ingest.
TwinMemberName = Annotated[str, StringConstraints(pattern=_MEMBER_PATTERN)]
TwinText = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
TwinValue = TypeAliasType(
    "TwinValue",
    "StrictBool | StrictInt | StrictFloat | TwinText | list[TwinValue] "
    "| dict[TwinMemberName, TwinValue] | None",
)
TwinDocument = SkipValidation[dict[TwinMemberName, TwinValue]]
TWIN_VALUE_REF = "#/components/schemas/TwinValue"
DESIRED_PATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": _MEMBER_PATTERN},
    "additionalProperties": {"$ref": TWIN_VALUE_REF},
    "description": (
        "A JSON merge patch (RFC 7396) of the desired properties: a member set to null is "
        "removed, an object is merged into the member, anything else replaces it. "
        f"At most {MAX_TWIN_BYTES} bytes, {MAX_TWIN_DEPTH} levels deep (the root is level "
        "1); member names are 1-128 characters without '.', '$', whitespace or control "
        "characters."
    ),
}


TWIN_EXAMPLE: dict[str, Any] = {
    "device_id": "fridge-1",
    "module_id": None,
    "tags": {"site": "A"},
    "desired": {"interval_s": 30},
    "desired_version": 3,
    "desired_updated_at": "2026-11-25T14:25:45.049Z",
    "desired_published_version": 3,
    "reported": {"interval_s": 60, "firmware": "2.0.4"},
    "reported_version": 7,
    "reported_updated_at": "2026-11-25T14:25:45.049Z",
    "delta": {"interval_s": 30},
}


class TwinPublic(BaseModel):
    """A device twin: its tags, desired and reported properties, and their difference."""

    model_config = ConfigDict(json_schema_extra={"examples": [TWIN_EXAMPLE]})

    device_id: str
    module_id: str | None = Field(
        default=None, description="The module whose twin this is; null: the device's own"
    )
    tags: dict[str, Any] = Field(description="The device's tags (set with PATCH /v1/devices/{id})")
    desired: TwinDocument
    desired_version: int = Field(
        description="One more per change; 0: never set. The ETag of this resource"
    )
    desired_updated_at: datetime | None
    desired_published_version: int = Field(
        description=(
            "The version last published, retained, on devices/{id}/twin/desired. Behind "
            "desired_version when publishing after a change failed; any PATCH (even {}) "
            "publishes the current document again"
        )
    )
    reported: TwinDocument
    reported_version: int = Field(description="One more per reported patch applied; 0: none")
    reported_updated_at: datetime | None
    delta: TwinDocument = Field(
        description=(
            "The desired members (recursively) whose reported value differs or is absent, "
            "with their desired values"
        )
    )
