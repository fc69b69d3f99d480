"""Rules settings: FLEETLINE_RULES_* (plus the shared FLEETLINE_* connection settings)."""

from __future__ import annotations

import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleetline.settings import ConsumerSettings

DEFAULT_PUSHSAFER_URL = "https://www.pushsafer.com/api"


def _default_client_id() -> str:
    # A persistent MQTT session belongs to a client id: stable across restarts of one
    # replica (a StatefulSet pod name), different between replicas.
    return f"fleetline-rules-{socket.gethostname()}"


class RulesSettings(ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLINE_RULES_", extra="ignore")

    client_id: str = Field(default_factory=_default_client_id, min_length=1, max_length=128)
    # How long the broker queues readings for us while we are away (a restart within
    # this evaluates what was published meanwhile).
    session_expiry_seconds: int = Field(default=3600, ge=60)
    # Messages received and not yet evaluated; above this, reading from the broker pauses.
    max_pending_messages: int = Field(default=10_000, ge=100, le=1_000_000)
    # Messages evaluated together, their transitions written in one transaction.
    batch_messages: int = Field(default=500, ge=1, le=100_000)

    # How often time-based transitions are checked (for_s and clear delays elapsed with
    # no new reading, no_data timeouts). An alarm is dated when it became due, whatever
    # the tick, so this only bounds how late it is announced.
    tick_interval_seconds: float = Field(default=1.0, ge=0.01, le=60)
    # Rules are reloaded when the API announces a change (NOTIFY fleetline_rules) and at
    # least this often; device tags and open alarms are re-read at the same time.
    reload_interval_seconds: float = Field(default=30.0, ge=0.1, le=3600)
    # Open alarms' value, peak and count are written at most this often (raises and
    # clears are written at once).
    flush_interval_seconds: float = Field(default=1.0, ge=0.01, le=60)

    # Actions: webhook, Pushsafer, device command.
    pushsafer_url: str = Field(default=DEFAULT_PUSHSAFER_URL, pattern=r"^https?://")
    action_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    action_max_attempts: int = Field(default=8, ge=1, le=100)
    # Retries wait base * 2^(attempt-1), capped.
    action_backoff_seconds: float = Field(default=2.0, gt=0, le=3600)
    action_backoff_max_seconds: float = Field(default=600.0, gt=0, le=86_400)
    # At most one command per target device this often; later ones wait their turn.
    command_min_interval_seconds: float = Field(default=10.0, ge=0, le=86_400)
    action_concurrency: int = Field(default=8, ge=1, le=256)

    # Message routes (/v1/routes): the devices each route's query selects are computed
    # in the database at every route change and at least this often, so a change of a
    # device's tags, twin or status alters which routes take its readings within it.
    route_refresh_interval_seconds: float = Field(default=10.0, ge=0.1, le=3600)
    # Delivered and failed route deliveries are kept this long (the delivery log, and
    # what a re-sent reading is recognised by), then deleted.
    route_log_retention_seconds: float = Field(default=86_400.0, ge=60, le=90 * 86_400)
    # Route deliveries in flight at once, and at most this many to one route: a receiver
    # that hangs until the timeout holds a few slots, not all of them.
    route_concurrency: int = Field(default=32, ge=1, le=1024)
    route_concurrency_per_route: int = Field(default=8, ge=1, le=1024)
    # Database connections of the delivery workers (claims, outcomes) and of the route
    # refresh and cleanup: a pool of their own, so that up to route_concurrency +
    # action_concurrency deliveries never keep a batch's write (which gates the MQTT
    # acknowledgements) waiting for a connection.
    delivery_pool_size: int = Field(default=4, ge=2, le=100)

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9103, ge=0, le=65535)
    shutdown_timeout_seconds: float = Field(default=10.0, ge=1)
