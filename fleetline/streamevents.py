"""Live events from storage to the API's ``/v1/stream``.

An event is a JSON object, as the WebSocket sends it:

- ``{"type": "telemetry", "device_id": "d1", "ts": "...Z", "values": {"temp": 21.5}}``
- ``{"type": "status", "device_id": "d1", "online": true, "ts": "...Z"}``
- ``{"type": "alarm", "device_id": "d1", "ts": "...Z", "alarm": {...}}``

Two ways carry them, each chosen for its rate:

- **Readings and status changes, over the broker.** After a batch commits, ingest
  publishes its rows and status changes (QoS 0) on :data:`EVENTS_TOPIC`, which each API
  process with stream clients subscribes to and builds the events from. A message is
  ``{"publisher": id, "seq": n, "rows": [...], "status": [...]}`` (:func:`batch_parts`);
  ``seq`` counts each publisher's messages from 0, and a publisher skips a number for
  each loss it knows of, so a subscriber sees a gap when a message was lost (a number
  lower than the last one: the publisher restarted, and may have lost some). Publishing
  happens outside the batch's transaction, so it never holds up a commit (NOTIFY, which
  this replaced, takes a database-wide lock at every commit that notifies) and costs
  ingest only while someone listens: an API process with stream clients keeps a retained
  message on ``{LISTENERS_TOPIC}/{listener id}`` (refreshed every
  :data:`LISTENER_REFRESH_SECONDS`, expiring after :data:`LISTENER_TTL_SECONDS`, cleared
  by its Last Will when the process dies; its payload is a token new with each
  presence), and ingest answers a new listener on ``{HEARD_TOPIC}/{listener id}`` with
  the token and the sequence number of its next message (:func:`heard`), which is where
  the listener starts counting. Topics outside ``devices/`` are out of every device's
  reach (the broker's auth plugin).
- **Alarms, over PostgreSQL NOTIFY** on :data:`CHANNEL`, in the transaction that raises,
  acknowledges or clears them: rare, and heard only once committed. PostgreSQL caps a
  payload below 8000 bytes, so events are packed into as many notifications as needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

from fleetline import db
from fleetline.db import NOTIFY_MANY_SQL
from fleetline.protocol import Row

CHANNEL = "fleetline_stream"
EVENTS_TOPIC = "fleetline/stream/events"
LISTENERS_TOPIC = "fleetline/stream/listeners"
HEARD_TOPIC = "fleetline/stream/heard"
LISTENER_TTL_SECONDS = 60.0
LISTENER_REFRESH_SECONDS = 20.0
# Send packed payloads ($2) on the channel ($1), in the caller's transaction.
NOTIFY_SQL = NOTIFY_MANY_SQL
# PostgreSQL refuses payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7900
# Under the broker's max_packet_size (deploy/mosquitto/fleetline.conf: 1 MiB): a whole
# batch of ingest's default 5000 rows fits in one message, encoded once.
MAX_MESSAGE_BYTES = 768 * 1024
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


def alarm_event(alarm: Mapping[str, Any], at: datetime | None) -> dict[str, Any]:
    """An alarm (as REST shows it) raised, updated, acknowledged or cleared at ``at``."""
    return {"type": "alarm", "device_id": alarm["device_id"], "ts": at, "alarm": dict(alarm)}


async def announce(con: db.Connection, events: Iterable[dict[str, Any]]) -> None:
    """Notify ``events`` in ``con``'s transaction: listeners hear of them at commit."""
    payloads = pack(events)
    if payloads:
        await con.execute(NOTIFY_SQL, CHANNEL, payloads)


def _split(event: dict[str, Any]) -> list[dict[str, Any]]:
    """A reading with many metrics as two events with the same ts; [] if it cannot be."""
    values = event.get("values")
    if not values or len(values) < 2:
        return []
    items = list(values.items())
    half = len(items) // 2
    return [{**event, "values": dict(items[:half])}, {**event, "values": dict(items[half:])}]


def _fitting(event: dict[str, Any], limit: int) -> list[bytes]:
    """The event encoded in pieces of at most ``limit`` bytes (a reading with hundreds of
    metrics split by :func:`_split`; what cannot be split that far is left out)."""
    encoded = orjson.dumps(event, option=_OPTIONS)
    if len(encoded) <= limit:
        return [encoded]
    return [piece for part in _split(event) for piece in _fitting(part, limit)]


def pack(events: Iterable[dict[str, Any]]) -> list[str]:
    """Notification payloads, each a JSON array below :data:`MAX_PAYLOAD_BYTES`."""
    payloads: list[str] = []
    chunk: list[bytes] = []
    size = 2
    for event in events:
        for encoded in _fitting(event, MAX_PAYLOAD_BYTES - 2):
            if size + len(encoded) + 1 > MAX_PAYLOAD_BYTES:
                payloads.append((b"[" + b",".join(chunk) + b"]").decode())
                chunk, size = [], 2
            chunk.append(encoded)
            size += len(encoded) + 1
    if chunk:
        payloads.append((b"[" + b",".join(chunk) + b"]").decode())
    return payloads


def _arrays(items: list[Any], limit: int) -> list[bytes]:
    """``items`` as JSON arrays of at most ``limit`` bytes each (one array, encoded in one
    call, in the common case; halved until each part fits; an item that cannot fit alone
    is left out)."""
    if not items:
        return []
    encoded = orjson.dumps(items, option=_OPTIONS)
    if len(encoded) <= limit:
        return [encoded]
    if len(items) == 1:
        return []
    half = len(items) // 2
    return _arrays(items[:half], limit) + _arrays(items[half:], limit)


def batch_parts(
    rows: list[Row],
    status: dict[str, tuple[bool, datetime]],
    limit: int = MAX_MESSAGE_BYTES,
) -> list[bytes]:
    """A committed batch as the bodies of messages on :data:`EVENTS_TOPIC`, each at most
    ``limit`` bytes: ``"rows":[[device, metric, ts, value, text], ...],"status":[]`` and
    ``"rows":[],"status":[[device, online, ts], ...]``. Rows go as ingest holds them,
    encoded in one call (0.14 us a row, against 1.2 us for building and encoding events):
    subscribers build the events (:func:`read_message`), and only while they have
    clients."""
    room = limit - 32  # the member names around each array
    changes = [(d, online, ts) for d, (online, ts) in status.items()]
    return [b'"rows":' + part + b',"status":[]' for part in _arrays(rows, room)] + [
        b'"rows":[],"status":' + part for part in _arrays(changes, room)
    ]


def heard(publisher: str, seq: int, token: str) -> bytes:
    """Ingest's answer to a listener's presence: the number its next message will carry,
    and the presence's token (so a late answer to an earlier presence is not taken)."""
    return orjson.dumps({"publisher": publisher, "seq": seq, "token": token})


def _from_publisher(payload: bytes) -> tuple[str, int, dict[str, Any]] | None:
    """(publisher, seq, the whole document) of what ingest published; None if malformed."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    publisher, seq = doc.get("publisher"), doc.get("seq")
    if not isinstance(publisher, str) or not isinstance(seq, int) or isinstance(seq, bool):
        return None
    return publisher, seq, doc


def read_heard(payload: bytes) -> tuple[str, int, str] | None:
    """(publisher, seq, token) of an answer made by :func:`heard`; None if malformed."""
    read = _from_publisher(payload)
    if read is None or not isinstance(token := read[2].get("token"), str):
        return None
    return read[0], read[1], token


def message(publisher: str, seq: int, body: bytes) -> bytes:
    """The payload published on :data:`EVENTS_TOPIC` for one part of a batch."""
    head = orjson.dumps({"publisher": publisher, "seq": seq})
    return head[:-1] + b"," + body + b"}"


def read_message(payload: bytes) -> tuple[str, int, list[dict[str, Any]]] | None:
    """(publisher, seq, events) of a message on :data:`EVENTS_TOPIC`; None if malformed."""
    read = _from_publisher(payload)
    if read is None:
        return None
    publisher, seq, doc = read
    rows, status = doc.get("rows", []), doc.get("status", [])
    if not isinstance(rows, list) or not isinstance(status, list):
        return None
    try:
        events = telemetry_events(rows)
        events += [
            {"type": "status", "device_id": d, "online": online, "ts": ts}
            for d, online, ts in status
        ]
    except (TypeError, ValueError):  # a row or change of the wrong shape
        return None
    return publisher, seq, events
