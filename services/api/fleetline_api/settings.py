"""API settings: FLEETLINE_API_* (plus the shared FLEETLINE_* connection settings)."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from fleetline import devicekeys
from fleetline.settings import MqttTarget, ServiceSettings, parse_mqtt_url


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLINE_API_", extra="ignore")

    # Device keys are derived from this secret (fleetline/devicekeys.py); the broker's
    # auth plugin holds the same one. Changing it invalidates every device key.
    device_key_secret: SecretStr = Field(
        validation_alias=AliasChoices("FLEETLINE_DEVICE_KEY_SECRET")
    )
    # Where devices reach the broker, for their connection strings (default: the
    # services' FLEETLINE_MQTT_URL host and port).
    device_mqtt_url: str | None = None

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    pool_size: int = Field(default=10, ge=1, le=200)
    # /v1/stream: events buffered per client before it is dropped as too slow, and how
    # many clients one API process serves.
    stream_queue_size: int = Field(default=1000, ge=10, le=100_000)
    stream_max_clients: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("device_key_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        devicekeys.check_secret(value.get_secret_value().encode())
        return value

    @field_validator("device_mqtt_url")
    @classmethod
    def _check_device_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_mqtt_url(value)
        return value

    @property
    def key_secret(self) -> bytes:
        return self.device_key_secret.get_secret_value().encode()

    @property
    def device_mqtt(self) -> MqttTarget:
        return parse_mqtt_url(self.device_mqtt_url) if self.device_mqtt_url else self.mqtt
