"""Ingest settings: FLEETLINE_INGEST_* (plus the shared FLEETLINE_* connection settings)."""

from __future__ import annotations

import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleetline.protocol import Limits
from fleetline.settings import ConsumerSettings


def _default_client_id() -> str:
    # A persistent MQTT session belongs to a client id: it must survive restarts of the
    # same replica (a StatefulSet pod name) and differ between replicas.
    return f"fleetline-ingest-{socket.gethostname()}"


class IngestSettings(ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETLINE_INGEST_", extra="ignore")

    client_id: str = Field(default_factory=_default_client_id, min_length=1, max_length=128)

    # A batch is written when it holds this many values or messages, or is this old.
    batch_rows: int = Field(default=5000, ge=1, le=1_000_000)
    batch_messages: int = Field(default=5000, ge=1, le=60_000)
    batch_ms: int = Field(default=50, ge=1, le=60_000)
    # Batches written at once, each on its own database connection: one is parsed and
    # encoded while another's COPY runs (bench/ingest.py, 2 cores, alternating runs: 2
    # writers drained batched payloads 1.35x and single readings 1.1x faster than 1).
    writers: int = Field(default=2, ge=1, le=8)
    # Backpressure: above any bound (max_pending_messages, and these: received, not yet
    # committed and acknowledged) ingest stops reading until the database catches up.
    max_pending_rows: int = Field(default=200_000, ge=1000, le=10_000_000)
    max_pending_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)

    # Last-seen is written at most this often per device (status changes always).
    seen_resolution_seconds: float = Field(default=5.0, ge=0)
    # How often to create partitions ahead and drop expired ones (plain PostgreSQL).
    maintenance_interval_seconds: float = Field(default=3600.0, ge=1)
    # Publish each committed batch's readings and status changes on the broker for the
    # API's live /v1/stream (only while an API process has stream clients).
    stream_events: bool = True
    # On SIGTERM, time allowed to write and acknowledge what was received.
    shutdown_timeout_seconds: float = Field(default=20.0, ge=1)

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9101, ge=0, le=65535)

    max_payload_bytes: int = Field(default=256 * 1024, ge=256)
    max_readings_per_message: int = Field(default=1000, ge=1)
    max_metrics_per_reading: int = Field(default=256, ge=1)
    max_future_seconds: float = Field(default=600.0, ge=0)

    @property
    def limits(self) -> Limits:
        return Limits(
            max_payload_bytes=self.max_payload_bytes,
            max_readings=self.max_readings_per_message,
            max_metrics=self.max_metrics_per_reading,
            max_future_seconds=self.max_future_seconds,
        )
