"""Rules settings: FLEETLINE_RULES_* (plus the shared FLEETLINE_* connection settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleetline.settings import ServiceSettings


class RulesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLINE_RULES_", extra="ignore")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9103, ge=0, le=65535)
