"""Files uploaded by devices (routes/files.py, routes/transfers.py; docs/uploads.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class DeviceFile(BaseModel):
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
    items: list[DeviceFile] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
