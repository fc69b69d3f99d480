"""The live stream's message format: what ingest publishes and what the API reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from fleetline import streamevents
from fleetline.protocol import Row

T0 = datetime(2026, 12, 6, 7, 0, 0, 500_000, tzinfo=UTC)


def rows(n: int, device: str = "d1") -> list[Row]:
    return [(device, "temp", T0 + timedelta(seconds=i), 20.0 + i, None) for i in range(n)]


def read(parts: list[bytes], publisher: str = "ingest-1") -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for seq, body in enumerate(parts):
        got = streamevents.read_message(streamevents.message(publisher, seq, body))
        assert got is not None
        assert got[:2] == (publisher, seq)
        events += got[2]
    return events


def test_a_batch_becomes_one_event_per_reading_and_status_change() -> None:
    batch: list[Row] = [
        ("d1", "temp", T0, 21.5, None),
        ("d1", "fw", T0, None, "1.2"),
        ("d2", "temp", T0, 19.0, None),
    ]
    parts = streamevents.batch_parts(batch, {"d3": (True, T0)})
    assert len(parts) == 2  # the rows, then the status changes
    assert read(parts) == [
        {"type": "telemetry", "device_id": "d1", "ts": "2026-12-06T07:00:00.500000Z",
         "values": {"temp": 21.5, "fw": "1.2"}},
        {"type": "telemetry", "device_id": "d2", "ts": "2026-12-06T07:00:00.500000Z",
         "values": {"temp": 19.0}},
        {"type": "status", "device_id": "d3", "online": True, "ts": "2026-12-06T07:00:00.500000Z"},
    ]


def test_a_large_batch_is_split_below_the_limit_and_loses_nothing() -> None:
    batch = rows(1000)
    # A whole fleet coming back at once, with the longest device ids.
    status = {f"{i:04d}" + "d" * 124: (True, T0) for i in range(2000)}
    limit = 4096
    parts = streamevents.batch_parts(batch, status, limit=limit)
    messages = [streamevents.message("ingest-1", 10**9, body) for body in parts]
    assert len(parts) > 60
    assert all(len(m) <= limit for m in messages), max(len(m) for m in messages)
    events = read(parts)
    assert [e["values"] for e in events[:1000]] == [{"temp": 20.0 + i} for i in range(1000)]
    assert {e["device_id"] for e in events[1000:]} == set(status)
    # At the shipped limit, ingest's largest batch (5000 rows) is one message.
    assert len(streamevents.batch_parts(rows(5000), {})) == 1


def test_the_answer_to_a_presence_round_trips_and_refuses_garbage() -> None:
    assert streamevents.read_heard(streamevents.heard("ingest-1", 42, "ab12")) == (
        "ingest-1", 42, "ab12")
    for bad in (b"", b"1", b"[]", b'{"publisher": "p", "seq": true, "token": "t"}',
                b'{"publisher": "p", "seq": 1}'):
        assert streamevents.read_heard(bad) is None, bad


def test_malformed_messages_are_refused_not_raised() -> None:
    good = orjson.loads(streamevents.message("p", 0, streamevents.batch_parts(rows(1), {})[0]))
    bad = [
        b"", b"not json", b"[]", b'"x"',
        orjson.dumps({**good, "seq": "1"}),
        orjson.dumps({**good, "seq": True}),
        orjson.dumps({**good, "publisher": 5}),
        orjson.dumps({**good, "rows": {"a": 1}}),
        orjson.dumps({**good, "rows": [["d1", "temp"]]}),
        orjson.dumps({**good, "rows": [[["d1"], "m", "t", 1, None]]}),
        orjson.dumps({**good, "status": [["d1", True]]}),
        orjson.dumps({**good, "status": 7}),
    ]
    for payload in bad:
        assert streamevents.read_message(payload) is None, payload
    assert streamevents.read_message(orjson.dumps(good)) is not None


def test_notify_payloads_stay_below_postgres_limit() -> None:
    many = {f"m{i}": float(i) for i in range(2000)}  # one reading far beyond 8000 bytes
    event = {"type": "telemetry", "device_id": "d1", "ts": T0, "values": many}
    payloads = streamevents.pack([event, event])
    assert all(len(p.encode()) < streamevents.MAX_PAYLOAD_BYTES for p in payloads)
    merged: dict[str, float] = {}
    for payload in payloads:
        for e in orjson.loads(payload):
            merged.update(e["values"])
    assert merged == many
