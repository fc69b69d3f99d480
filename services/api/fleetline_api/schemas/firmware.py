"""Firmware releases (routes/firmware.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetline.releases import NAME, SHA256_HEX
from fleetline_api.schemas.common import WholeNumber

ReleaseName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=f"^{NAME.pattern}$")
]


class FirmwareCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "version": "2.1.0",
                    "target": "esp32",
                    "kind": "image",
                    "notes": "fixes the sensor's drift",
                    "size": 1048576,
                    "sha256": "9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f",
                }
            ]
        },
    )

    version: ReleaseName = Field(
        description="The release's version, e.g. 2.1.0", examples=["2.1.0"]
    )
    target: ReleaseName = Field(description="The board or model it is for", examples=["esp32"])
    kind: Literal["bundle", "image"] = Field(
        description="bundle: the application's files (`fleetline firmware build`); image: "
        "a whole firmware binary"
    )
    notes: str = Field(default="", max_length=2000, description="What changed, for people")
    size: WholeNumber = Field(
        ge=1, description="The image's size in bytes (at most FLEETLINE_API_FIRMWARE_MAX_BYTES)"
    )
    sha256: Annotated[str, StringConstraints(pattern=f"^{SHA256_HEX.pattern}$")] = Field(
        description="The image's SHA-256, lower-case hex: the upload completes only if its "
        "bytes hash to it"
    )


class FirmwarePublic(BaseModel):
    id: int
    version: str
    target: str
    kind: str
    notes: str
    size: int
    sha256: str
    received: int = Field(description="Bytes uploaded so far: the next part starts here")
    status: Literal["uploading", "released"]
    manifest: str | None = Field(
        description="Once released: the signed manifest (canonical JSON) devices check"
    )
    signature: str | None = Field(
        description="Once released: the release key's ECDSA P-256 signature of the "
        "manifest, r || s in hex"
    )
    created_at: datetime
    released_at: datetime | None


class FirmwareList(BaseModel):
    items: list[FirmwarePublic]


class ReleaseKey(BaseModel):
    public_key: str = Field(
        description="The release key's public point x || y in hex: RELEASE_KEY in a "
        "board's config_local.py"
    )
