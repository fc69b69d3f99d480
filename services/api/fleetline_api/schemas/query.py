"""Bodies of ``/v1/query``: a device query and the devices it matches."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleetline import devicequery
from fleetline_api.schemas.common import DEVICE_EXAMPLE, WholeNumber
from fleetline_api.schemas.twins import TWIN_EXAMPLE

QUERY_DESCRIPTION = (
    "A device query, as `tags.site = 'A' AND reported.fw < '1.2'`: `id`, `status`, "
    "`parent`, `gateway`, `tags.<name>`, `desired.<path>`, `reported.<path>` compared with "
    "`= != < <= > >= IN`, "
    "joined with `AND`, `OR`, `NOT` and parentheses. Empty: every device"
)


class QueryRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"query": "tags.site = 'A' AND reported.firmware != '2.1.0'", "limit": 100}
            ]
        },
    )

    query: str = Field(
        default="", max_length=devicequery.MAX_QUERY_LENGTH, description=QUERY_DESCRIPTION
    )
    limit: WholeNumber = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(
        default=None, max_length=128, description="`next_cursor` of the previous page"
    )


# The example device, as a query matches it (its tags, status and twin).
DEVICE_MATCH_EXAMPLE: dict[str, Any] = {
    "device_id": DEVICE_EXAMPLE["id"],
    **{k: DEVICE_EXAMPLE[k] for k in ("tags", "online", "last_seen")},
    **{k: TWIN_EXAMPLE[k] for k in ("desired", "desired_version", "reported", "reported_version")},
}


class DeviceMatch(BaseModel):
    """A device a query matched: its registry entry, status and twin."""

    model_config = ConfigDict(json_schema_extra={"examples": [DEVICE_MATCH_EXAMPLE]})
    device_id: str
    tags: dict[str, Any]
    online: bool
    last_seen: datetime | None
    desired: dict[str, Any]
    desired_version: int
    reported: dict[str, Any]
    reported_version: int


class QueryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [DEVICE_MATCH_EXAMPLE], "next_cursor": DEVICE_EXAMPLE["id"]}]
        }
    )
    items: list[DeviceMatch] = Field(description="Matching devices, ordered by id")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
