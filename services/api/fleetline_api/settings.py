"""API settings: FLEETLINE_API_* (plus the shared FLEETLINE_* connection settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from fleetline import devicekeys, releases
from fleetline.settings import MqttTarget, ServiceSettings, parse_mqtt_url

BOOTSTRAP_TOKEN_MIN_LENGTH = 32


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

    # The first API key without a database shell (fleetline_api/routes/apikeys.py): a
    # bearer token of at least 32 characters (from a Secret) that POST /v1/apikeys
    # accepts only while no active admin key exists. Unset (the default): no such path.
    bootstrap_token: SecretStr | None = None

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    # Checked before anything else, the API key included: a larger body gets 413, larger
    # headers (names and values, all together) 431.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    # Requests a second per API key in this process, and the burst a key may make at
    # once (fleetline_api/ratelimit.py); more get 429 with Retry-After. 0: no limit.
    rate_per_key: float = Field(default=50.0, ge=0, le=100_000)
    rate_burst_per_key: int = Field(default=200, ge=1, le=1_000_000)
    # Registrations per enrollment (REST and MQTT together, per API process): a
    # second's rate and a burst. Beyond, a device is told when to try again.
    provision_rate: float = Field(default=20.0, ge=0, le=100_000)
    provision_burst: int = Field(default=200, ge=1, le=1_000_000)
    # Failed POST /v1/provision attempts per client address: this many, then one a
    # second (0: no limit).
    provision_failures_burst: int = Field(default=10, ge=0, le=1_000_000)
    # Proxies whose X-Forwarded-For names the client (uvicorn's forwarded_allow_ips:
    # addresses or "*"): behind an Ingress, its address, so limits per client address
    # see the client and not the proxy.
    forwarded_allow_ips: str = "127.0.0.1"
    # /metrics (Prometheus), with /healthz and /readyz, on a listener of its own that
    # the public Service does not expose; 0: /metrics on the API's own port, for anyone.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    pool_size: int = Field(default=10, ge=1, le=200)
    # Firmware releases (docs/ota.md): the release key (PEM, P-256: `fleetline firmware
    # keygen`) that signs every manifest, without which no release can be made; the
    # largest image (uploaded in parts, each one request within max_body_bytes).
    release_key_file: Path | None = None
    firmware_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # Devices' HTTPS (docs/ota.md): a listener of its own, TLS with this certificate and
    # key, serving only what devices use (transfers, provisioning, health); 0: none (a
    # TLS-terminating proxy in front of the API's port serves devices instead).
    device_host: str = "0.0.0.0"
    device_port: int = Field(default=0, ge=0, le=65535)
    device_tls_cert_file: Path | None = None
    device_tls_key_file: Path | None = None
    # The base of the URLs devices are given for downloads and uploads (default: https
    # on the device listener, at the host devices reach the broker at).
    device_http_url: str | None = None
    # How long such a URL may be used; a device asks again for a fresh one to resume.
    transfer_url_ttl_s: int = Field(default=900, ge=10, le=86_400)
    # Files uploaded by devices (docs/uploads.md): the largest file, the bytes a device
    # may keep in all (its unfinished uploads count), how long an unfinished upload
    # waits before it is deleted, and how often they are looked for.
    upload_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1, le=1024 * 1024 * 1024)
    upload_quota_bytes: int = Field(default=64 * 1024 * 1024, ge=1, le=1024**4)
    upload_ttl_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    upload_sweep_s: float = Field(default=60.0, ge=0.1, le=3600)
    # /v1/stream: events buffered per client before it is dropped as too slow, and how
    # many clients one API process serves.
    stream_queue_size: int = Field(default=1000, ge=10, le=100_000)
    stream_max_clients: int = Field(default=1000, ge=1, le=100_000)
    # /v1/jobs (fleetline_api/workers/jobs/): how often the runner looks for work; how
    # often it sweeps (leases that ran out, finished jobs, the reports and phase timeouts
    # of rollout devices); devices one API process runs at once over all jobs; how long
    # past a device's own timeout its claim lasts before another runner takes it over
    # (the process is presumed dead); starts per device before it counts as failed
    # ("abandoned"); devices one job may target; days a finished job is kept (0: for
    # ever); the runner's own database connections (so that a large job cannot take the
    # REST routes' pool).
    jobs_poll_interval_seconds: float = Field(default=0.5, ge=0.05, le=60)
    jobs_sweep_interval_seconds: float = Field(default=1.0, ge=0.05, le=60)
    jobs_max_in_flight: int = Field(default=1000, ge=1, le=10_000)
    jobs_pool_size: int = Field(default=8, ge=1, le=100)
    jobs_lease_grace_seconds: float = Field(default=30, ge=1, le=3600)
    jobs_max_attempts: int = Field(default=3, ge=1, le=100)
    jobs_max_devices: int = Field(default=100_000, ge=1, le=1_000_000)
    jobs_retention_days: int = Field(default=30, ge=0, le=36_500)
    # Cloud-to-device messages (fleetline_api/workers/c2d.py): messages a device may have queued
    # or sent but not yet acknowledged (more are refused with 409); the time to live of a
    # message that names none (at most 48 h, the API's limit); how long a sent message
    # waits for the device's ack before it is sent again while the device stays online;
    # how many times one message is sent at most; how often the dispatcher looks for
    # due and expired messages; how long finished messages are kept.
    c2d_max_depth: int = Field(default=50, ge=1, le=10_000)
    c2d_default_ttl_s: int = Field(default=3600, ge=1, le=172_800)
    c2d_ack_timeout_s: float = Field(default=30.0, ge=0.5, le=3600)
    c2d_max_deliveries: int = Field(default=10, ge=1, le=1000)
    c2d_sweep_s: float = Field(default=1.0, ge=0.05, le=60)
    c2d_retention_s: int = Field(default=7 * 86_400, ge=60, le=366 * 86_400)

    @field_validator(
        "release_key_file",
        "device_tls_cert_file",
        "device_tls_key_file",
        "device_http_url",
        "bootstrap_token",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("bootstrap_token")
    @classmethod
    def _check_bootstrap_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < BOOTSTRAP_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"FLEETLINE_API_BOOTSTRAP_TOKEN needs at least {BOOTSTRAP_TOKEN_MIN_LENGTH} "
                "characters (e.g. `openssl rand -hex 32`)"
            )
        return value

    @field_validator("device_http_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("FLEETLINE_API_DEVICE_HTTP_URL is an https:// (or http://) URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _device_listener(self) -> ApiSettings:
        if self.device_port and not (self.device_tls_cert_file and self.device_tls_key_file):
            raise ValueError(
                "FLEETLINE_API_DEVICE_PORT needs FLEETLINE_API_DEVICE_TLS_CERT_FILE and "
                "FLEETLINE_API_DEVICE_TLS_KEY_FILE: the devices' listener speaks only TLS"
            )
        return self

    @field_validator("release_key_file")
    @classmethod
    def _release_key_loads(cls, path: Path | None) -> Path | None:
        if path is not None:
            releases.load_key(path)  # ReleaseError is a ValueError: one line, named
        return path

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


def device_http_url(settings: ApiSettings) -> str:
    """The base URL devices download from and upload to."""
    if settings.device_http_url:
        return settings.device_http_url
    host = settings.device_mqtt.host
    if settings.device_port:
        return f"https://{host}:{settings.device_port}"
    return f"http://{host}:{settings.port}"


def device_mqtt_url(settings: ApiSettings) -> str:
    """Where devices reach the broker, as a URL without credentials."""
    target = settings.device_mqtt
    return f"{'mqtts' if target.tls else 'mqtt'}://{target.host}:{target.port}"
