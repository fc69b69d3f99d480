"""Settings shared by every service, read from FLEETLINE_* environment variables.

Each service has one ``BaseSettings`` subclass of :class:`ServiceSettings` with its own
``env_prefix`` (``FLEETLINE_INGEST_``...). The connection settings all services share
are read from unprefixed names (``FLEETLINE_DATABASE_URL``, ``FLEETLINE_MQTT_URL``)
through validation aliases, so one ConfigMap serves every service.
"""

from __future__ import annotations

import sys
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/fleetline"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
MQTT_PORT = 1883
MQTTS_PORT = 8883

MqttProtocol = Literal["auto", "5", "3.1.1"]


class MqttTarget(BaseModel):
    """Where the broker is, parsed from ``mqtt://user:pass@host:port`` or, over TLS,
    ``mqtts://...`` (the server verified against ``ca_file``, else the system's CAs)."""

    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: str | None = None


def parse_mqtt_url(url: str, *, ca_file: str | None = None) -> MqttTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"MQTT URL has no host: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"MQTT URL has an invalid port: {url!r}") from exc
    tls = parts.scheme in ("mqtts", "ssl")
    password = SecretStr(unquote(parts.password)) if parts.password else None
    return MqttTarget(
        host=parts.hostname,
        port=port or (MQTTS_PORT if tls else MQTT_PORT),
        username=unquote(parts.username) if parts.username else None,
        password=password,
        tls=tls,
        ca_file=ca_file if tls else None,
    )


def _shared(name: str) -> AliasChoices:
    return AliasChoices(f"FLEETLINE_{name}")


class ServiceSettings(BaseSettings):
    """What every service reads; subclasses add their own prefixed knobs."""

    model_config = SettingsConfigDict(env_prefix="FLEETLINE_", extra="ignore")

    database_url: SecretStr = Field(
        default=SecretStr(DEFAULT_DATABASE_URL), validation_alias=_shared("DATABASE_URL")
    )
    mqtt_url: SecretStr = Field(
        default=SecretStr(DEFAULT_MQTT_URL), validation_alias=_shared("MQTT_URL")
    )
    mqtt_protocol: MqttProtocol = Field(default="auto", validation_alias=_shared("MQTT_PROTOCOL"))
    # With an mqtts:// URL, the CA file the broker's certificate is verified against
    # (empty: the system's CAs).
    mqtt_ca_file: str | None = Field(default=None, validation_alias=_shared("MQTT_CA_FILE"))
    # Seconds between keepalive pings of the services' broker connections; a broker that
    # stops answering is noticed within twice this (while a consumer's reads are paused
    # for backpressure, only once a ping cannot be sent, or on resume).
    mqtt_keepalive_seconds: int = Field(
        default=30, ge=2, le=3600, validation_alias=_shared("MQTT_KEEPALIVE_SECONDS")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", validation_alias=_shared("LOG_LEVEL")
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias=_shared("LOG_FORMAT")
    )

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: SecretStr) -> SecretStr:
        parse_mqtt_url(value.get_secret_value())
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("database URL must start with postgresql://")
        return value

    @property
    def mqtt(self) -> MqttTarget:
        return parse_mqtt_url(self.mqtt_url.get_secret_value(), ca_file=self.mqtt_ca_file)

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()


class ConsumerSettings(ServiceSettings):
    """What the services that consume device messages (ingest, rules) configure alike,
    each under its own prefix; each sets its own ``client_id`` default and may change
    the others' (see :class:`fleetline.consumer.AckConsumer`)."""

    # A persistent MQTT session belongs to a client id: stable across restarts of one
    # replica (a StatefulSet pod name), different between replicas.
    client_id: str = Field(min_length=1, max_length=128)
    # Empty (the default): a plain persistent subscription, for a single replica; the
    # broker restores it after a restart and queues what devices publish meanwhile.
    # Set, replicas in the same group split the devices' messages (MQTT 5 shared
    # subscription), but Mosquitto (2.0.11 to 2.1, measured) does not restore shared
    # subscriptions after a restart: what devices publish between the broker's restart
    # and the replicas' resubscribe reaches no one and is lost.
    share_group: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    # How long the broker keeps the session (and queues for it) while the service is away.
    session_expiry_seconds: int = Field(default=86_400, ge=60)
    # Messages received and not yet committed and acknowledged; above this, reading from
    # the broker pauses until the database catches up.
    max_pending_messages: int = Field(default=20_000, ge=100, le=1_000_000)


class StorageSettings(ServiceSettings):
    """How telemetry is stored; read by the migration runner and by ingest's maintenance."""

    model_config = SettingsConfigDict(env_prefix="FLEETLINE_STORAGE_", extra="ignore")

    # "auto" uses TimescaleDB when the extension is available on the server.
    timescale: Literal["auto", "on", "off"] = "auto"
    # Raw readings older than this are dropped (partitions or chunks).
    raw_retention: str = "90 days"
    # Width of one partition (plain PostgreSQL) or chunk (TimescaleDB).
    partition_interval: str = "1 day"
    # Partitions created ahead of time on plain PostgreSQL.
    partitions_ahead: int = Field(default=3, ge=1, le=60)
    # TimescaleDB compresses chunks older than this.
    compress_after: str = "7 days"
    # Minute and hour rollups (readings_1m, readings_1h) are kept this long. Keep the
    # minute rollups at least as long as raw readings: hours are built from minutes, and
    # a late reading can arrive for any time within the raw retention.
    rollup_1m_retention: str = "90 days"
    rollup_1h_retention: str = "730 days"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load(cls: type[SettingsT]) -> SettingsT:
    """``cls()`` from the environment; a bad or missing setting exits with a message that
    names the environment variable, instead of a traceback."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            name = field if field.startswith("FLEETLINE_") else f"{prefix}{field}".upper()
            lines.append(f"  {name}: {error['msg']}")
        sys.stderr.write(f"error: invalid settings ({cls.__name__}):\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (for messages and banners)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
