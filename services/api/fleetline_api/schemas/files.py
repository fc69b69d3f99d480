"""Files uploaded by devices (routes/files.py, routes/transfers.py; docs/uploads.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FILE_EXAMPLE: dict[str, Any] = {
    "id": 318,
    "device_id": "cam-2",
    "name": "snapshots/door.jpg",
    "content_type": "image/jpeg",
    "state": "complete",
    "size": 48213,
    "sha256": "5e" * 32,
    "received": 48213,
    "created_at": "2026-11-25T14:29:58.004Z",
    "completed_at": "2026-11-25T14:30:00.120Z",
    "expires_at": None,
}


class DeviceFile(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                FILE_EXAMPLE,
                {
                    # A part uploaded, the rest to come.
                    **FILE_EXAMPLE,
                    "state": "uploading",
                    "received": 16384,
                    "completed_at": None,
                    "expires_at": "2026-11-26T14:29:58.004Z",
                },
            ]
        }
    )
    id: int
    device_id: str
    name: str
    content_type: str
    state: Literal["uploading", "complete"]
    size: int = Field(description="Bytes, as the device declared them")
    sha256: str = Field(description="The bytes' SHA-256: checked when the last part lands")
    received: int = Field(description="Bytes uploaded so far: the next part starts here")
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime | None = Field(
        description="An unfinished upload is deleted then (none once complete)"
    )

    @classmethod
    def from_row(cls, row: Any) -> DeviceFile:
        return cls(**{k: v for k, v in dict(row).items() if k != "blob_id"})


class DeviceFilePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [FILE_EXAMPLE], "next_cursor": None}]}
    )
    items: list[DeviceFile] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
