"""A batch: what ingest received since the last write, and what to acknowledge after it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from fleetline import protocol
from fleetline.protocol import Limits, PayloadError, Row

T = TypeVar("T")

DEVICE_ID_RULE = "device id is not [A-Za-z0-9_.:-]{1,128}, or is '.' or '..'"
UNKNOWN_KIND = (
    "unknown topic kind {!r}: a device publishes on devices/{{id}}/ telemetry, status, "
    "twin/reported, c2d/ack and methods/{{request_id}}/res, and a module on "
    "devices/{{id}}/modules/{{module_id}}/ telemetry and twin/reported"
)
# Dead-letter reasons longer than this are cut (a payload can hold 1000 bad readings).
MAX_REASON_CHARS = 2000

# (received_at, topic, device_id, reason, payload): a row of ingest_dead_letter.
DeadLetter = tuple[datetime, str, str | None, str, bytes]
# (device_id, module_id, patch, received_at, topic, payload): a reported-properties patch
# of a device's twin (module_id '') or of one of its modules' twins, applied in arrival
# order; the topic and payload make its dead letter if the database refuses it.
TwinPatch = tuple[str, str, dict[str, Any], datetime, str, bytes]
# (device_id, message id, outcome, received_at, topic, payload): a device's acknowledgement
# of a cloud-to-device message; the topic and payload make its dead letter if it names no
# message of that device.
C2dAck = tuple[str, str, str, datetime, str, bytes]


@dataclass(slots=True)
class Batch:
    generation: int
    started: float = 0.0
    rows: list[Row] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # (mid, qos) of every message in the batch, in arrival order: acknowledged after commit.
    acks: list[tuple[int, int]] = field(default_factory=list)
    # The messages themselves, aligned with ``acks``: (topic, payload, received_at, used),
    # where ``used`` is False for a message only acknowledged (a retained replay). Kept to
    # rebuild the batch: one by one if the database rejects it, or without what the
    # broker will redeliver after a reconnect.
    raw: list[tuple[str, bytes, datetime, bool]] = field(default_factory=list)
    payload_bytes: int = 0
    # device -> last time heard from; device -> (online, when) from the status topic.
    seen: dict[str, datetime] = field(default_factory=dict)
    status: dict[str, tuple[bool, datetime]] = field(default_factory=dict)
    twin: list[TwinPatch] = field(default_factory=list)
    c2d_acks: list[C2dAck] = field(default_factory=list)
    telemetry_messages: int = 0
    status_messages: int = 0
    twin_messages: int = 0
    c2d_ack_messages: int = 0
    # On a device's topics but not ingest's to handle (twin/desired, c2d, method calls).
    other_messages: int = 0
    # Not on a known device topic (or not a valid device id): dead-lettered.
    unknown_messages: int = 0
    # Rebuilt after its connection closed: written without acknowledgement.
    stale: bool = False

    @property
    def messages(self) -> int:
        return len(self.acks)


def _reason(errors: list[str]) -> str:
    text = "; ".join(errors)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def collect(
    batch: Batch, topic: str, payload: bytes, received_at: datetime, limits: Limits
) -> None:
    """Add one message to ``batch``: its values, status, or a dead letter. Never raises."""
    parts = protocol.split_device_topic(topic)
    if parts is None:
        batch.unknown_messages += 1
        batch.dead.append((received_at, topic, None, "topic is not devices/{id}/...", payload))
        return
    device_id, kind = parts
    if not protocol.device_ids.valid(device_id):
        batch.unknown_messages += 1
        batch.dead.append((received_at, topic, None, DEVICE_ID_RULE, payload))
        return
    if kind == protocol.TELEMETRY:
        _collect_telemetry(batch, device_id, topic, payload, received_at, limits)
    elif kind == protocol.STATUS:
        batch.status_messages += 1
        state = payload.strip().lower()
        if state in (protocol.STATUS_ONLINE, protocol.STATUS_OFFLINE):
            online = state == protocol.STATUS_ONLINE
            batch.status[device_id] = (online, received_at)
            if online:  # an "offline" is often the broker speaking (Last Will), not the device
                batch.seen[device_id] = received_at
        else:
            batch.dead.append(
                (received_at, topic, device_id, "status must be 'online' or 'offline'", payload)
            )
    elif kind == protocol.TWIN_REPORTED:
        _collect_twin_patch(batch, device_id, "", topic, payload, received_at)
    elif kind == protocol.C2D_ACK:
        batch.c2d_ack_messages += 1
        ack = _parsed(batch, protocol.parse_c2d_ack, device_id, topic, payload, received_at)
        if ack is not None:
            batch.c2d_acks.append((device_id, *ack, received_at, topic, payload))
    elif (module := protocol.split_module_kind(kind)) and module[1] == protocol.TWIN_REPORTED:
        _collect_twin_patch(batch, device_id, module[0], topic, payload, received_at)
    elif module and module[1] == protocol.TELEMETRY:
        _collect_telemetry(batch, device_id, topic, payload, received_at, limits, module[0])
    elif protocol.is_not_ingested(kind):
        batch.other_messages += 1
    else:
        batch.unknown_messages += 1
        batch.dead.append((received_at, topic, device_id, UNKNOWN_KIND.format(kind), payload))


def _collect_telemetry(
    batch: Batch,
    device_id: str,
    topic: str,
    payload: bytes,
    received_at: datetime,
    limits: Limits,
    module_id: str = "",
) -> None:
    """A device's readings, or a module's: stored as the device's series named
    ``{module_id}/{metric}``."""
    batch.telemetry_messages += 1
    rows = batch.rows
    start = len(rows)
    try:
        errors = protocol.parse_telemetry(device_id, payload, received_at, limits, rows)
    except PayloadError as exc:
        errors = [str(exc)]
    except Exception as exc:  # a parser bug must cost one message, not the service
        errors = [f"unexpected error while parsing: {exc!r}"]
    if module_id:
        for i in range(start, len(rows)):
            device, metric, ts, value, text = rows[i]
            rows[i] = (device, protocol.series_name(module_id, metric), ts, value, text)
    if errors:
        batch.dead.append((received_at, topic, device_id, _reason(errors), payload))
    batch.seen[device_id] = received_at


def _parsed(
    batch: Batch,
    parse: Callable[[bytes], T],
    device_id: str,
    topic: str,
    payload: bytes,
    received_at: datetime,
) -> T | None:
    """``parse(payload)``, or None once the message is dead-lettered with the reason; the
    device counts as seen either way."""
    batch.seen[device_id] = received_at
    try:
        return parse(payload)
    except Exception as exc:  # PayloadError; anything else is a bug costing one message
        reason = str(exc) if isinstance(exc, PayloadError) else f"unexpected error: {exc!r}"
        batch.dead.append((received_at, topic, device_id, _reason([reason]), payload))
        return None


def _collect_twin_patch(
    batch: Batch, device_id: str, module_id: str, topic: str, payload: bytes, received_at: datetime
) -> None:
    batch.twin_messages += 1
    patch = _parsed(batch, protocol.parse_twin_patch, device_id, topic, payload, received_at)
    if patch is not None:
        batch.twin.append((device_id, module_id, patch, received_at, topic, payload))


def rebuild(batch: Batch, limits: Limits, *, without_redelivered: bool) -> Batch:
    """The same messages collected again; with ``without_redelivered``, only those that
    are safe to write although the broker may deliver them again: QoS 0 messages (never
    redelivered) and idempotent ones (readings that all carry ``ts``, acknowledgements of
    cloud-to-device messages). A broker that crashed may have lost the others' copies
    too; those are its stated crash window. Acknowledgements are not carried over."""
    fresh = Batch(generation=batch.generation, stale=True)
    for (topic, payload, received_at, used), (_mid, qos) in zip(batch.raw, batch.acks, strict=True):
        if used and not (without_redelivered and qos and not _idempotent(topic, payload)):
            fresh.raw.append((topic, payload, received_at, used))
            collect(fresh, topic, payload, received_at, limits)
    return fresh


def _idempotent(topic: str, payload: bytes) -> bool:
    """Writing the message twice has the effect of writing it once."""
    parts = protocol.split_device_topic(topic)
    if parts is None:
        return False
    kind = parts[1]
    module = protocol.split_module_kind(kind)
    if module is not None:
        kind = module[1]
    return kind == protocol.C2D_ACK or (
        kind == protocol.TELEMETRY and protocol.readings_carry_ts(payload)
    )
