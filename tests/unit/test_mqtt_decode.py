"""decode_publish: a PUBLISH's variable header read from raw bytes (MQTT 3.1.1 and 5,
section 3.3), what it leaves to paho, and which packets it refuses as malformed."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetline.mqtt import decode_publish, topic_name_problem

PUBLISH = 0x30


def header(qos: int = 0, *, retain: bool = False, dup: bool = False) -> int:
    """The first byte of a PUBLISH fixed header."""
    return PUBLISH | (dup << 3) | (qos << 1) | int(retain)


def varint(n: int) -> bytes:
    """``n`` as an MQTT variable byte integer (MQTT 5 section 1.5.5)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8_string(s: str) -> bytes:
    """A UTF-8 encoded string: 2-byte big-endian length, then the bytes."""
    data = s.encode()
    return len(data).to_bytes(2, "big") + data


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    *,
    mid: int | None = None,
    properties: bytes | None = None,
) -> bytes:
    """The bytes after a PUBLISH's remaining length: topic name, packet id (when ``mid``
    is given), property length and properties (when ``properties`` is given: MQTT 5),
    then the payload."""
    raw = topic.encode() if isinstance(topic, str) else topic
    out = len(raw).to_bytes(2, "big") + raw
    if mid is not None:
        out += mid.to_bytes(2, "big")
    if properties is not None:
        out += varint(len(properties)) + properties
    return out + payload


def user_property(key: str, value: str) -> bytes:
    return b"\x26" + utf8_string(key) + utf8_string(value)


def test_varint_helper_matches_the_spec_examples() -> None:
    """The helper itself, against MQTT 5 section 1.5.5's boundaries."""
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01"
    assert varint(16_383) == b"\xff\x7f"
    assert varint(16_384) == b"\x80\x80\x01"
    assert varint(268_435_455) == b"\xff\xff\xff\x7f"


# MQTT 3.1.1


def test_qos0_has_no_packet_id() -> None:
    """At QoS 0 the payload follows the topic directly; the message id is 0."""
    packet = publish("devices/d1/telemetry", b'{"values": {"t": 1}}')
    decoded = decode_publish(header(0), packet, v5=False)
    assert decoded == ("devices/d1/telemetry", 0, 0, False, 2 + 20)
    assert packet[decoded[4] :] == b'{"values": {"t": 1}}'


@pytest.mark.parametrize("mid", [1, 0x1234, 65535])
def test_qos1_packet_id(mid: int) -> None:
    """The 2-byte big-endian packet id follows the topic at QoS 1."""
    packet = publish("a/b", b"xyz", mid=mid)
    assert decode_publish(header(1), packet, v5=False) == ("a/b", mid, 1, False, 2 + 3 + 2)


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("dup", [False, True])
def test_retain_is_reported_and_dup_ignored(qos: int, retain: bool, dup: bool) -> None:
    """Every combination of flags: retain comes back, dup changes nothing."""
    packet = publish("t", b"p", mid=7 if qos else None)
    decoded = decode_publish(header(qos, retain=retain, dup=dup), packet, v5=False)
    assert decoded == ("t", 7 if qos else 0, qos, retain, 3 + (2 if qos else 0))


@pytest.mark.parametrize("qos", [0, 1])
def test_empty_payload(qos: int) -> None:
    """A payload may be empty: it starts at the end of the packet."""
    packet = publish("t/x", mid=9 if qos else None)
    decoded = decode_publish(header(qos), packet, v5=False)
    assert decoded is not None
    assert decoded[4] == len(packet)
    assert packet[decoded[4] :] == b""


@pytest.mark.parametrize("packet_type", [bytes, bytearray])
def test_large_payload(packet_type: type[bytes] | type[bytearray]) -> None:
    """A 300 kB payload (paho hands a bytearray) is sliced out whole."""
    payload = bytes(range(256)) * 1200
    packet = packet_type(publish("devices/big/telemetry", payload, mid=42))
    decoded = decode_publish(header(1), packet, v5=False)
    assert decoded is not None
    topic, mid, _, _, start = decoded
    assert (topic, mid) == ("devices/big/telemetry", 42)
    assert packet[start:] == payload


def test_multibyte_utf8_topic() -> None:
    """The topic length counts bytes, not characters."""
    topic = "devices/Zürich-温度-🌡/telemetry"
    packet = publish(topic, b"\x00\x01", mid=3)
    decoded = decode_publish(header(1), packet, v5=False)
    assert decoded == (topic, 3, 1, False, 2 + len(topic.encode()) + 2)
    assert packet[decoded[4] :] == b"\x00\x01"


def test_invalid_utf8_topic_is_decoded_with_replacement_characters() -> None:
    """Not a decoding error: the handler dead-letters such a topic."""
    packet = publish(b"devices/\xff\xfe/telemetry", b"p", mid=5)
    decoded = decode_publish(header(1), packet, v5=False)
    assert decoded == ("devices/\ufffd\ufffd/telemetry", 5, 1, False, len(packet) - 1)


# MQTT 5


@pytest.mark.parametrize("qos", [0, 1])
def test_v5_empty_properties(qos: int) -> None:
    """A property length of 0 is one byte."""
    packet = publish("a/b", b"payload", mid=11 if qos else None, properties=b"")
    decoded = decode_publish(header(qos), packet, v5=True)
    assert decoded == ("a/b", 11 if qos else 0, qos, False, 2 + 3 + (2 if qos else 0) + 1)
    assert packet[decoded[4] :] == b"payload"


@pytest.mark.parametrize(
    "properties",
    [
        pytest.param(b"\x01\x01", id="payload-format-indicator"),
        pytest.param(b"\x03" + utf8_string("application/json"), id="content-type"),
        pytest.param(user_property("k", "v"), id="user-property"),
        pytest.param(
            b"\x01\x01"
            + b"\x02\x00\x00\x0e\x10"  # message expiry interval, 4-byte integer
            + b"\x03"
            + utf8_string("text/plain")
            + user_property("k", "v")
            + user_property("k", "v2"),
            id="several",
        ),
    ],
)
def test_v5_properties_are_skipped(properties: bytes) -> None:
    """Whatever the properties, the payload starts right after them."""
    packet = publish("t", b"\x7b\x7d", mid=2, properties=properties)
    decoded = decode_publish(header(1), packet, v5=True)
    assert decoded == ("t", 2, 1, False, 2 + 1 + 2 + 1 + len(properties))
    assert packet[decoded[4] :] == b"{}"


@pytest.mark.parametrize(
    ("size", "length_bytes"),
    [(127, 1), (128, 2), (200, 2), (16_383, 2), (16_384, 3), (20_000, 3)],
)
def test_v5_multibyte_property_length(size: int, length_bytes: int) -> None:
    """A property length of 128 or more takes 2 bytes, of 16384 or more 3 bytes."""
    # One user property with a key of 1 byte; its value fills the rest of ``size``.
    properties = user_property("k", "v" * (size - 1 - 3 - 2))
    assert len(properties) == size
    assert len(varint(size)) == length_bytes
    packet = publish("t/u", b"body", mid=65535, properties=properties)
    decoded = decode_publish(header(1, retain=True), packet, v5=True)
    assert decoded == ("t/u", 65535, 1, True, 2 + 3 + 2 + length_bytes + size)
    assert packet[decoded[4] :] == b"body"


@pytest.mark.parametrize("qos", [0, 1])
def test_v5_properties_packed_by_paho(qos: int) -> None:
    """paho's own property encoder (length included) is read the same way."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    props.UserProperty = [("a", "b"), ("trace", "x" * 300)]  # over 127: a 2-byte length
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    assert packed[0] & 0x80  # the length really takes more than one byte
    head = publish("devices/d/telemetry", mid=8 if qos else None)
    packet = head + packed + b"[1]"
    decoded = decode_publish(header(qos), packet, v5=True)
    assert decoded == ("devices/d/telemetry", 8 if qos else 0, qos, False, len(packet) - 3)
    assert packet[decoded[4] :] == b"[1]"


def test_v3_packet_is_not_read_as_v5() -> None:
    """The same bytes give a different payload start under each protocol version."""
    packet = publish("t", b"\x00rest", mid=1)
    assert decode_publish(header(1), packet, v5=False) == ("t", 1, 1, False, 5)
    # Under MQTT 5 the first payload byte is taken as an empty property length.
    assert decode_publish(header(1), packet, v5=True) == ("t", 1, 1, False, 6)


# Left to paho


@pytest.mark.parametrize("v5", [False, True])
def test_qos2_is_left_to_paho(v5: bool) -> None:
    packet = publish("t", b"p", mid=1, properties=b"" if v5 else None)
    assert decode_publish(header(2), packet, v5=v5) is None
    assert decode_publish(header(2, retain=True, dup=True), packet, v5=v5) is None


@pytest.mark.parametrize("qos", [0, 1])
def test_empty_topic_topic_alias_is_left_to_paho(qos: int) -> None:
    """An MQTT 5 topic alias with an empty topic name: paho maps it to a topic."""
    properties = b"\x23\x00\x05"  # topic alias 5
    packet = publish("", b"p", mid=4 if qos else None, properties=properties)
    assert decode_publish(header(qos), packet, v5=True) is None
    assert decode_publish(header(qos), b"\x00\x00", v5=False) is None


# Malformed

QOS3 = "QoS 3 is reserved"
SHORT = "packet ends inside its variable header"
TOPIC = "topic runs past the packet"
VARINT = "malformed property length"
PROPS = "properties run past the packet"


@pytest.mark.parametrize(
    ("head", "packet", "v5", "reason"),
    [
        pytest.param(0x36, publish("t", b"p", mid=1), False, QOS3, id="qos3"),
        pytest.param(0x3F, publish("t", b"p", mid=1), True, QOS3, id="qos3-all-flags-v5"),
        pytest.param(header(0), b"", False, SHORT, id="empty-packet"),
        pytest.param(header(1), b"\x00", False, SHORT, id="one-byte-packet"),
        pytest.param(header(2), b"\x00", True, SHORT, id="one-byte-packet-qos2"),
        pytest.param(header(0), b"\x00\x05abcd", False, TOPIC, id="topic-past-end"),
        pytest.param(header(0), b"\xff\xff" + b"a" * 100, False, TOPIC, id="topic-65535"),
        pytest.param(header(1), b"\x00\x01t", False, SHORT, id="qos1-no-packet-id"),
        pytest.param(header(1), b"\x00\x01t\x00", False, SHORT, id="qos1-half-packet-id"),
        pytest.param(header(0), b"\x00\x01t", True, SHORT, id="v5-no-property-length"),
        pytest.param(header(1), b"\x00\x01t\x00\x01", True, SHORT, id="v5-qos1-no-length"),
        pytest.param(header(0), b"\x00\x01t\x80", True, SHORT, id="v5-length-cut-1"),
        pytest.param(header(1), b"\x00\x01t\x00\x01\xff\xff", True, SHORT, id="v5-length-cut-2"),
        pytest.param(header(0), b"\x00\x01t\xff\xff\xff\xff\x01", True, VARINT, id="varint-5"),
        pytest.param(header(0), b"\x00\x01t\x80\x80\x80\x80\x00", True, VARINT, id="varint-5-0"),
        pytest.param(header(0), b"\x00\x01t\x05\x01\x01", True, PROPS, id="props-past-end"),
        pytest.param(
            header(1),
            publish("t", mid=1) + b"\x80\x01" + b"\x00" * 127,
            True,
            PROPS,
            id="props-2-byte-length-past-end",
        ),
        pytest.param(header(0), b"\x00\x01t\xff\xff\xff\x7f", True, PROPS, id="max-varint"),
    ],
)
def test_malformed_packets_raise(head: int, packet: bytes, v5: bool, reason: str) -> None:
    """Each is refused at the step that finds it malformed."""
    with pytest.raises(ValueError, match=reason):
        decode_publish(head, packet, v5=v5)


def test_properties_ending_exactly_at_the_packet_end_are_valid() -> None:
    """The boundary of the previous case: properties filling the packet, no payload."""
    packet = b"\x00\x01t\x03\x23\x00\x05"
    assert decode_publish(header(0), packet, v5=True) == ("t", 0, 0, False, len(packet))


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("", "empty"),
        ("fleet/+/out", "wildcard"),
        ("fleet/#", "wildcard"),
        ("fleet/\x01", "U+0001"),
        ("fleet/\x85", "U+0085"),  # C1 controls pass a plain printable-check
        ("fleet/\ufdd0", "U+FDD0"),
        ("fleet/\uffff", "U+FFFF"),
        ("fleet/\U0001fffe", "U+1FFFE"),
        ("a" * 65536, "65,535 bytes"),
    ],
)
def test_topic_names_brokers_refuse(topic: str, why: str) -> None:
    """A PUBLISH to such a topic makes Mosquitto end the connection (malformed packet)."""
    problem = topic_name_problem(topic)
    assert problem is not None and why in problem


def test_topic_names_brokers_take() -> None:
    for topic in ("fleet/out", "fleet/énergie/温度", "a" * 65535, "$x/y", "fleet//out"):
        assert topic_name_problem(topic) is None
