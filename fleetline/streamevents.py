"""Live events from storage to the API's ``/v1/stream``, over PostgreSQL NOTIFY.

Ingest notifies in the transaction that stores a batch, so listeners hear of readings
and status changes only once they are committed (and never of a batch rolled back).
A notification's payload is a JSON array of events, as the WebSocket sends them:

- ``{"type": "telemetry", "device_id": "d1", "ts": "...Z", "values": {"temp": 21.5}}``
- ``{"type": "status", "device_id": "d1", "online": true, "ts": "...Z"}``
- ``{"type": "alarm", "device_id": "d1", "ts": "...Z", "alarm": {...}}`` (the rules
  service, when an alarm is raised, updated, acknowledged or cleared)

PostgreSQL caps a payload below 8000 bytes, so a batch's events are packed into as
many notifications as needed.

Announcing costs ingest CPU and the database NOTIFY traffic, so it happens only while
someone listens: an API process with stream clients keeps a row in ``stream_listeners``
(expiring after :data:`LISTENER_TTL_SECONDS`, refreshed every
:data:`LISTENER_REFRESH_SECONDS`), and ingest looks every :data:`LISTENER_POLL_SECONDS`.
A process that starts listening waits :data:`LISTENER_SETTLE_SECONDS` before telling its
first client it is subscribed, so ingest has noticed by then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

from fleetline.db import NOTIFY_MANY_SQL
from fleetline.protocol import Row

CHANNEL = "fleetline_stream"
LISTENER_TTL_SECONDS = 15.0
LISTENER_REFRESH_SECONDS = 5.0
LISTENER_POLL_SECONDS = 1.0
LISTENER_SETTLE_SECONDS = LISTENER_POLL_SECONDS + 0.5
ANY_LISTENER = "SELECT EXISTS (SELECT 1 FROM stream_listeners WHERE expires_at > now())"
# Send packed payloads ($2) on the channel ($1), in the caller's transaction.
NOTIFY_SQL = NOTIFY_MANY_SQL
# PostgreSQL refuses payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7900
_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


def telemetry_events(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """One event per (device, ts): the values a reading carried, in arrival order."""
    groups: dict[tuple[str, datetime], dict[str, Any]] = {}
    for device_id, metric, ts, value, text in rows:
        values = groups.get((device_id, ts))
        if values is None:
            values = groups[(device_id, ts)] = {}
        values[metric] = text if text is not None else value
    return [
        {"type": "telemetry", "device_id": d, "ts": ts, "values": values}
        for (d, ts), values in groups.items()
    ]


def status_events(status: dict[str, tuple[bool, datetime]]) -> list[dict[str, Any]]:
    return [
        {"type": "status", "device_id": d, "online": online, "ts": ts}
        for d, (online, ts) in status.items()
    ]


def alarm_event(alarm: Mapping[str, Any], at: datetime | None) -> dict[str, Any]:
    """An alarm (as REST shows it) raised, updated, acknowledged or cleared at ``at``."""
    return {"type": "alarm", "device_id": alarm["device_id"], "ts": at, "alarm": dict(alarm)}


async def announce(con: Any, events: Iterable[dict[str, Any]]) -> None:
    """Notify ``events`` in ``con``'s transaction: listeners hear of them at commit."""
    payloads = pack(events)
    if payloads:
        await con.execute(NOTIFY_SQL, CHANNEL, payloads)


def _fitting(event: dict[str, Any]) -> list[bytes]:
    """The event encoded; a reading too large for one notification (hundreds of
    metrics) is split into several events with the same ts."""
    encoded = orjson.dumps(event, option=_OPTIONS)
    values = event.get("values")
    if len(encoded) + 2 <= MAX_PAYLOAD_BYTES or not values or len(values) < 2:
        return [encoded] if len(encoded) + 2 <= MAX_PAYLOAD_BYTES else []
    items = list(values.items())
    half = len(items) // 2
    return _fitting({**event, "values": dict(items[:half])}) + _fitting(
        {**event, "values": dict(items[half:])}
    )


def pack(events: Iterable[dict[str, Any]]) -> list[str]:
    """Notification payloads, each a JSON array below :data:`MAX_PAYLOAD_BYTES`."""
    payloads: list[str] = []
    chunk: list[bytes] = []
    size = 2
    for event in events:
        for encoded in _fitting(event):
            if size + len(encoded) + 1 > MAX_PAYLOAD_BYTES:
                payloads.append((b"[" + b",".join(chunk) + b"]").decode())
                chunk, size = [], 2
            chunk.append(encoded)
            size += len(encoded) + 1
    if chunk:
        payloads.append((b"[" + b",".join(chunk) + b"]").decode())
    return payloads
