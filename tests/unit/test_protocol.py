"""Payload parsing: what a message turns into, and why a bad one is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleetline.protocol import Limits, PayloadError, Row, parse_telemetry, split_device_topic
from fleetline.settings import parse_mqtt_url

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LIMITS = Limits()


def parse(payload: bytes, limits: Limits = LIMITS) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    errors = parse_telemetry("dev-1", payload, NOW, limits, rows)
    return rows, errors


def test_one_reading_becomes_one_row_per_value() -> None:
    rows, errors = parse(b'{"ts": "2026-11-24T10:00:00.5+01:00", '
                         b'"values": {"t": 21, "on": false, "fw": "1.0"}}')
    ts = datetime(2026, 11, 24, 9, 0, 0, 500000, tzinfo=UTC)
    assert errors == []
    assert rows == [("dev-1", "t", ts, 21.0, None), ("dev-1", "on", ts, 0.0, None),
                    ("dev-1", "fw", ts, None, "1.0")]


def test_epoch_milliseconds_and_missing_ts() -> None:
    rows, _ = parse(b'[{"ts": 1764000000123, "values": {"a": 1}}, {"values": {"b": 2}}]')
    assert rows[0][2] == datetime(2025, 11, 24, 16, 0, 0, 123000, tzinfo=UTC)
    assert rows[1][2] == NOW


def test_epoch_milliseconds_are_exact_across_the_window() -> None:
    """Integer milliseconds take a fast path (a double division): the times it gives are
    those of exact arithmetic, at the window's edges and between them."""
    earliest, latest = LIMITS.window(NOW)
    edges = [int(earliest.timestamp() * 1000), int(latest.timestamp() * 1000)]
    step = (edges[1] - edges[0]) // 997
    samples = edges + [edges[0] + k * step + k % 1000 for k in range(1, 997)]
    payload = ",".join(f'{{"ts": {ms}, "values": {{"a": 1}}}}' for ms in samples)
    rows, errors = parse(f"[{payload}]".encode(), Limits(max_readings=1000))
    assert errors == []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert [r[2] for r in rows] == [epoch + timedelta(milliseconds=ms) for ms in samples]
    _, errors = parse(f'{{"ts": {edges[1] + 1}, "values": {{"a": 1}}}}'.encode())
    assert errors and "s ahead" in errors[0]
    _, errors = parse(f'{{"ts": {edges[0] - 1}, "values": {{"a": 1}}}}'.encode())
    assert errors and "before 2000-01-01" in errors[0]


def test_valid_readings_survive_their_bad_neighbours() -> None:
    rows, errors = parse(b'[{"values": {"a": 1}}, {"values": {"b c": 2, "d": 3}}, 5]')
    assert [r[1] for r in rows] == ["a", "d"]
    assert errors == ["reading[1]: metric name 'b c' is not [A-Za-z0-9_.-]{1,64}",
                      "reading[2]: a reading must be a JSON object"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "not JSON"),
        (b"[]", "empty batch"),
        (b"[" + b'{"values": {"a": 1}},' * 1000 + b'{"values": {"a": 1}}]', "exceeds 1000"),
    ],
)
def test_unusable_messages_raise(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        parse(payload)


def test_payload_size_limit() -> None:
    with pytest.raises(PayloadError, match="exceeds 100"):
        parse(b'{"values": {"a": 1}}' + b" " * 100, Limits(max_payload_bytes=100))


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        ('"2026-13-01T00:00:00Z"', "not an RFC 3339 time"),
        ('"2026-11-24T10:00:00"', "no time zone offset"),
        (str(int((NOW + timedelta(hours=1)).timestamp() * 1000)), "s ahead"),
        ("946684799000", "before 2000-01-01"),
        ("true", "must be an RFC 3339 string or epoch milliseconds"),
        ("1e300", "out of range"),
    ],
)
def test_bad_timestamps(ts: str, reason: str) -> None:
    rows, errors = parse(b'{"ts": ' + ts.encode() + b', "values": {"a": 1}}')
    assert rows == []
    assert len(errors) == 1 and reason in errors[0]


@pytest.mark.parametrize(
    ("value", "reason"),
    [("null", "must be a number"), ("[1]", "must be a number"), ('{"x": 1}', "must be a number"),
     ('"' + "x" * 1025 + '"', "longer than 1024"), ('"a\\u0000"', "NUL character")],
)
def test_bad_values(value: str, reason: str) -> None:
    rows, errors = parse(b'{"values": {"a": ' + value.encode() + b', "ok": 1}}')
    assert [r[1] for r in rows] == ["ok"]
    assert reason in errors[0]


def test_values_beyond_the_rollup_safe_range_are_refused() -> None:
    rows, errors = parse(b'{"values": {"big": 1e300, "huge": 1' + b"0" * 120 + b', "ok": -2}}')
    assert [r[1] for r in rows] == ["ok"]
    assert len(errors) == 2 and all("within" in e for e in errors)


def test_metric_count_limit() -> None:
    values = ", ".join(f'"m{i}": {i}' for i in range(5))
    _, errors = parse(b'{"values": {' + values.encode() + b"}}", Limits(max_metrics=4))
    assert errors == ["reading: 5 metrics, more than 4"]


def test_topics() -> None:
    assert split_device_topic("devices/d1/telemetry") == ("d1", "telemetry")
    assert split_device_topic("devices/d1/twin/reported") == ("d1", "twin/reported")
    assert split_device_topic("other/d1/telemetry") is None
    assert split_device_topic("devices/d1") is None


def test_mqtt_urls() -> None:
    target = parse_mqtt_url("mqtt://svc%40a:p%3Ass@broker:8883")
    assert (target.host, target.port, target.username) == ("broker", 8883, "svc@a")
    assert target.password is not None and target.password.get_secret_value() == "p:ss"
    assert parse_mqtt_url("mqtt://localhost").port == 1883
    with pytest.raises(ValueError, match="mqtt://"):
        parse_mqtt_url("http://broker")


def test_readings_older_than_the_retention_are_refused() -> None:
    limits = Limits(max_age=timedelta(days=90))
    old = int((NOW - timedelta(days=91)).timestamp() * 1000)
    rows, errors = parse(b'{"ts": ' + str(old).encode() + b', "values": {"a": 1}}', limits)
    assert rows == [] and "older than the retention (90 days)" in errors[0]
    recent = int((NOW - timedelta(days=89)).timestamp() * 1000)
    rows, errors = parse(b'{"ts": ' + str(recent).encode() + b', "values": {"a": 1}}', limits)
    assert errors == [] and len(rows) == 1


def test_refused_connack_codes_are_read_from_paho_reason_codes() -> None:
    from aiomqtt.exceptions import MqttConnectError
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from fleetline.mqtt import connack_code

    refused = MqttConnectError(ReasonCode(PacketTypes.CONNACK, "Not authorized"))
    assert connack_code(refused) == 135
    assert connack_code(MqttConnectError(ReasonCode(PacketTypes.CONNACK, "Server busy"))) == 137
