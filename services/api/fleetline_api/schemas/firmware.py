"""Firmware releases (routes/firmware.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetline.releases import NAME, SHA256_HEX, Manifest
from fleetline_api.schemas.common import WholeNumber

ReleaseName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=f"^{NAME.pattern}$")
]


FIRMWARE_CREATE_EXAMPLE: dict[str, Any] = {
    "version": "2.1.0",
    "target": "esp32",
    "kind": "image",
    "notes": "fixes the sensor's drift",
    "size": 1048576,
    "sha256": "9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f",
}


class FirmwareCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [FIRMWARE_CREATE_EXAMPLE]}
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


# The release above once uploaded whole and signed.
FIRMWARE_EXAMPLE: dict[str, Any] = {
    "id": 1,
    **FIRMWARE_CREATE_EXAMPLE,
    "received": FIRMWARE_CREATE_EXAMPLE["size"],
    "status": "released",
    "manifest": Manifest(
        **{k: FIRMWARE_CREATE_EXAMPLE[k] for k in ("version", "target", "kind", "size", "sha256")}
    )
    .to_bytes()
    .decode(),
    "signature": "4e" * 32 + "1d" * 32,
    "created_at": "2026-11-25T14:25:45.049Z",
    "released_at": "2026-11-25T14:27:12.803Z",
}


class FirmwarePublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                FIRMWARE_EXAMPLE,
                {
                    # Created, half its bytes uploaded: no manifest yet.
                    **FIRMWARE_EXAMPLE,
                    "received": 524288,
                    "status": "uploading",
                    "manifest": None,
                    "signature": None,
                    "released_at": None,
                },
            ]
        }
    )
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
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [FIRMWARE_EXAMPLE]}]})
    items: list[FirmwarePublic]


class ReleaseKey(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"public_key": "a7" * 64}]})
    public_key: str = Field(
        description="The release key's public point x || y in hex: RELEASE_KEY in a "
        "board's config_local.py"
    )
