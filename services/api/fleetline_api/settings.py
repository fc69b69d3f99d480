"""API settings: FLEETLINE_API_* (plus the shared FLEETLINE_* connection settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleetline.settings import ServiceSettings


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLINE_API_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    pool_size: int = Field(default=10, ge=1, le=200)
