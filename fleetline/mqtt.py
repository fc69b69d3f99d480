"""The one place that knows aiomqtt's and paho's internals.

aiomqtt 2.5 has no public manual-acknowledgement API (upstream issue empicano/aiomqtt#345)
and hands every message to an asyncio queue that, when bounded, silently discards
messages paho has already acknowledged. Ingest needs three things aiomqtt does not
offer, so this module provides them on the wrapped paho client:

* manual PUBACK (``Client.ack``): a message is acknowledged only after its rows commit;
* a direct message handler that bypasses aiomqtt's queue (no per-message ``Message``
  object, no unbounded queue);
* pausing socket reads, so a slow database turns into TCP backpressure on the broker
  instead of memory growth. Mosquitto 2.0.11 honours an MQTT 5 Receive Maximum only
  until the first acknowledgements arrive (measured), so the broker's in-flight window
  cannot be relied on to bound what we hold.

It also gives paho a buffered socket read: paho reads a packet with several small
``recv`` calls (type byte, length bytes, body), one packet per readiness event; reading
64 KiB at a time and parsing every packet in it in one callback removes most system
calls and event-loop turns from the hot path. One callback reads the socket once, so
the event loop (batch sealing, writes, probes) runs at least every 64 KiB.

Moving to aiomqtt 3 (which has manual ack and its own reconnect) touches this file only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleetline.protocol import MODULES, STATUS, TELEMETRY, TOPIC_ROOT
from fleetline.settings import ConsumerSettings, MqttProtocol, MqttTarget

log = logging.getLogger(__name__)

RECONNECT_MAX_SECONDS = 30.0
READ_CHUNK_BYTES = 65536
# CONNACK codes that retrying cannot fix: bad user name or password, not authorized
# (paho reports MQTT 3.1.1's codes 4 and 5 as these MQTT 5 reason codes).
_FATAL_CONNACK = {134, 135}
# Unsupported protocol version (MQTT 5 code 132; 3.1.1's code 1, as paho reports it).
_UNSUPPORTED_PROTOCOL = {1, 132}

# What other modules use of aiomqtt, so that this module stays the only one importing it
# (and paho): the client, its connection errors, a Last Will.
Client = aiomqtt.Client
MqttError = aiomqtt.MqttError
Will = aiomqtt.Will
# (topic, payload, message id, QoS, retain flag) of one PUBLISH.
MessageHandler = Callable[[str, bytes, int, int, bool], None]


def consumer_client(settings: ConsumerSettings, protocol: MqttProtocol) -> aiomqtt.Client:
    """A persistent session under the replica's client id; its Receive Maximum is the
    pending bound, since messages are acknowledged only once handled."""
    return make_client(
        settings.mqtt,
        identifier=settings.client_id,
        protocol=protocol,
        persistent=True,
        session_expiry_seconds=settings.session_expiry_seconds,
        receive_maximum=settings.max_pending_messages,
        keepalive_seconds=settings.mqtt_keepalive_seconds,
        # Its acknowledgements go out in bursts after each commit: let TCP coalesce them.
        nodelay=False,
    )


def device_message_topics(*, every_kind: bool = False) -> list[str]:
    """Every device's telemetry (its own and its modules') and status; with
    ``every_kind`` (ingest), everything under ``devices/``, so that no device message
    goes unseen: what ingest does not handle it dead-letters, or leaves to the service it
    belongs to."""
    if every_kind:
        return [f"{TOPIC_ROOT}/#"]
    return [
        f"{TOPIC_ROOT}/+/{TELEMETRY}",
        f"{TOPIC_ROOT}/+/{MODULES}/+/{TELEMETRY}",
        f"{TOPIC_ROOT}/+/{STATUS}",
    ]


def shared(client: aiomqtt.Client, share_group: str, topics: list[str]) -> list[str]:
    """``topics`` in the shared subscription ``share_group`` (none when it is empty or the
    connection is MQTT 3.1.1)."""
    if is_v5(client) and share_group:
        return [f"$share/{share_group}/{t}" for t in topics]
    return topics


class MqttAuthError(Exception):
    """The broker refused our credentials; retrying will not help."""


def connack_code(exc: MqttConnectError) -> int:
    """The numeric CONNACK code of a refused connection (paho hands a ReasonCode)."""
    rc: Any = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else -1


def backoff_seconds(attempt: int) -> float:
    """Capped, jittered delay before reconnect attempt ``attempt`` (0-based)."""
    return min(RECONNECT_MAX_SECONDS, random.uniform(0.2, 1.5 ** min(10, attempt)))


def make_client(
    target: MqttTarget,
    *,
    identifier: str,
    protocol: MqttProtocol,
    persistent: bool,
    session_expiry_seconds: int = 86_400,
    receive_maximum: int | None = None,
    will: aiomqtt.Will | None = None,
    keepalive_seconds: int = 30,
    nodelay: bool = True,
) -> aiomqtt.Client:
    """An aiomqtt client; ``protocol='auto'`` starts with MQTT 5 (see :func:`connected`).

    ``nodelay`` sets TCP_NODELAY: a small packet (a method request, an answer) goes out
    at once instead of waiting for the peer's delayed ACK (about 40 ms a hop on Linux)."""
    v5 = protocol != "3.1.1"
    props: Properties | None = None
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_seconds if persistent else 0
        if receive_maximum:
            props.ReceiveMaximum = min(receive_maximum, 65535)
    return aiomqtt.Client(
        target.host,
        target.port,
        identifier=identifier,
        username=target.username,
        password=target.password.get_secret_value() if target.password else None,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else not persistent,
        clean_start=False if (persistent and v5) else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=props,
        will=will,
        keepalive=keepalive_seconds,
        timeout=10,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)] if nodelay else (),
        tls_context=tls_context(target),
    )


def tls_context(target: MqttTarget) -> ssl.SSLContext | None:
    """For an ``mqtts://`` target: TLS 1.2 or later, the server's certificate and host
    name verified against the target's CA file (else the system's CAs)."""
    if not target.tls:
        return None
    context = ssl.create_default_context(cafile=target.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be the topic of a PUBLISH (None when it can): empty, over
    65,535 bytes, a wildcard, or a character brokers refuse in a topic (MQTT 5 section
    1.5.4: NUL, control characters U+0001-U+001F and U+007F-U+009F, noncharacters,
    surrogates). Mosquitto disconnects a client that publishes such a topic."""
    if not topic:
        return "is empty"
    if "+" in topic or "#" in topic:
        return "holds a wildcard (+ or #)"
    for ch in topic:
        code = ord(ch)
        if (
            code <= 0x1F
            or 0x7F <= code <= 0x9F
            or 0xD800 <= code <= 0xDFFF
            or 0xFDD0 <= code <= 0xFDEF
            or (code & 0xFFFE) == 0xFFFE
        ):
            return f"holds the character U+{code:04X}, which MQTT topics may not"
    if len(topic.encode()) > 65535:
        return "is longer than 65,535 bytes"
    return None


def publish_properties(
    client: aiomqtt.Client,
    *,
    expiry_seconds: float | None = None,
    user_properties: Sequence[tuple[str, str]] = (),
    content_type: str | None = None,
) -> Properties | None:
    """PUBLISH properties for a message on ``client``'s connection; None on MQTT 3.1.1,
    which has none, or when none is asked for. ``expiry_seconds`` becomes the Message
    Expiry Interval (whole seconds, at least 1): the broker drops the message when it
    runs out, so a device with a persistent session does not get it late."""
    if not is_v5(client) or (expiry_seconds is None and not user_properties and not content_type):
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if expiry_seconds is not None:
        props.MessageExpiryInterval = max(1, math.ceil(expiry_seconds))
    if user_properties:
        props.UserProperty = list(user_properties)
    if content_type:
        props.ContentType = content_type
    return props


def is_v5(client: aiomqtt.Client) -> bool:
    return bool(client._client.protocol == paho.MQTTv5)  # noqa: SLF001


@asynccontextmanager
async def connected(
    make: Callable[[MqttProtocol], aiomqtt.Client],
    protocol: MqttProtocol,
    *,
    prepare: Callable[[aiomqtt.Client], None] | None = None,
) -> AsyncIterator[aiomqtt.Client]:
    """Connect once; with ``auto``, fall back to MQTT 3.1.1 when the broker refuses v5.

    ``prepare`` runs on each client before it connects. Raises :class:`MqttAuthError`
    for refused credentials, ``aiomqtt.MqttError`` for everything a retry may fix.
    """
    client = make(protocol)
    if prepare:
        prepare(client)
    try:
        await client.__aenter__()
    except MqttConnectError as exc:
        code = connack_code(exc)
        if code in _FATAL_CONNACK:
            raise MqttAuthError(str(exc)) from exc
        if protocol == "auto" and code in _UNSUPPORTED_PROTOCOL:
            log.warning(
                "broker refused MQTT 5; falling back to MQTT 3.1.1 "
                "(no shared subscriptions: run a single replica)"
            )
            client = make("3.1.1")
            if prepare:
                prepare(client)
            await client.__aenter__()
        else:
            raise
    try:
        yield client
    finally:
        try:
            await client.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass


def subscribe_nowait(
    client: aiomqtt.Client, topics: list[str], *, qos: int = 1
) -> list[asyncio.Future[Any]]:
    """Subscribe without waiting for the SUBACK; a refusal is logged when it arrives, and
    ends the connection. Returns the SUBACKs' futures, for whoever wants to know. On
    MQTT 5 no retained messages are sent for these subscriptions (Retain Handling 2).

    A persistent session's backlog arrives right after the CONNACK, before any SUBACK.
    When that backlog fills the pending bound, reads pause, and an awaited SUBACK
    would never be read: the subscription must not wait on it.
    """
    paho_client: Any = client._client  # noqa: SLF001
    futures: list[asyncio.Future[Any]] = []
    # MQTT 5: no retained messages on subscribing. A consumer took each one in when it
    # was published (its persistent session queued it); a replay of every retained
    # message under devices/ (statuses, desired twins) at each new session is only work.
    options = SubscribeOptions(qos=qos, retainHandling=2) if is_v5(client) else None
    for topic in topics:
        if options is None:
            result, mid = paho_client.subscribe(topic, qos)
        else:
            result, mid = paho_client.subscribe(topic, options=options)
        if result != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(result, f"could not subscribe to {topic}")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        client._pending_subscribes[mid] = fut  # noqa: SLF001

        def check(done: asyncio.Future[Any], topic: str = topic) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            codes = done.result()
            if any(getattr(code, "value", 0) >= 0x80 for code in codes):
                log.error("broker refused the subscription to %s: %s", topic, codes)
                # Connected but receiving nothing is worse than retrying visibly.
                if not client._disconnected.done():  # noqa: SLF001
                    client._disconnected.set_exception(  # noqa: SLF001
                        aiomqtt.MqttError(f"subscription to {topic} refused: {codes}")
                    )

        fut.add_done_callback(check)
        futures.append(fut)
    return futures


def granted(futures: list[asyncio.Future[Any]]) -> bool:
    """Every SUBACK of :func:`subscribe_nowait` arrived and granted its subscription."""
    return all(
        f.done()
        and not f.cancelled()
        and f.exception() is None
        and all(getattr(code, "value", 0) < 0x80 for code in f.result())
        for f in futures
    )


async def watch_topics(
    make: Callable[[MqttProtocol], aiomqtt.Client],
    protocol: MqttProtocol,
    topics: list[str],
    handle: Callable[[str, bytes], None],
    *,
    connection: Callable[[aiomqtt.Client | None], None] | None = None,
) -> None:
    """Subscribe to ``topics`` (QoS 0) on a connection of its own and hand each message
    to ``handle``, reconnecting with backoff for ever. For low-rate side channels (the
    broker's ``$SYS`` counters), apart from a consumer whose reads may be paused.
    ``connection`` is told the client once it is subscribed, and None when it is gone
    (whoever publishes on the side connection uses it meanwhile)."""
    attempt = 0
    while True:
        try:
            async with connected(make, protocol) as client:
                await client.subscribe([(topic, 0) for topic in topics])
                attempt = 0
                if connection is not None:
                    connection(client)
                try:
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            handle(str(message.topic), bytes(payload))
                finally:
                    if connection is not None:
                        connection(None)
        except (aiomqtt.MqttError, MqttAuthError) as exc:
            log.warning("side connection for %s lost or refused: %s", topics, exc)
        except Exception:  # a bug here must not end the service it serves
            log.exception("side connection for %s failed", topics)
        await asyncio.sleep(backoff_seconds(attempt))
        attempt += 1


def unsubscribe_nowait(client: aiomqtt.Client, topics: list[str]) -> None:
    """Drop subscriptions a persistent session may still hold (an earlier release's),
    without waiting for the UNSUBACK; one that does not exist is no error."""
    paho_client: Any = client._client  # noqa: SLF001
    result, mid = paho_client.unsubscribe(topics)
    if result != paho.MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(result, f"could not unsubscribe from {topics}")
    # aiomqtt's UNSUBACK handler expects a waiter for every message id.
    client._pending_unsubscribes[mid] = asyncio.Event()  # noqa: SLF001


async def wait_disconnected(client: aiomqtt.Client) -> None:
    """Return (or raise the broker error) when the connection ends."""
    await asyncio.shield(client._disconnected)  # noqa: SLF001


async def serve(client: aiomqtt.Client, jobs: dict[str, Coroutine[Any, Any, None]]) -> None:
    """Run ``jobs`` (by task name) on ``client``'s connection until it ends or one fails;
    the end of the connection raises its ``MqttError`` itself, not in an ExceptionGroup,
    so a caller's reconnect loop catches it as it would from any other call."""
    try:
        async with asyncio.TaskGroup() as tg:
            for name, job in jobs.items():
                tg.create_task(job, name=name)
            tg.create_task(wait_disconnected(client), name="mqtt.connection")
    except ExceptionGroup as group:
        first = group.exceptions[0]
        if isinstance(first, aiomqtt.MqttError):
            raise first from None
        raise


def decode_publish(
    header: int, packet: bytes | bytearray, *, v5: bool
) -> tuple[str, int, int, bool, int] | None:
    """(topic, message id, QoS, retain flag, where the payload starts) of a PUBLISH whose
    fixed header's first byte is ``header`` and whose remaining bytes are ``packet``;
    None for what it leaves to paho (QoS 2, a topic alias with an empty topic). Raises
    ValueError for a malformed packet (MQTT 3.1.1 section 3.3, MQTT 5 section 3.3)."""
    qos = (header & 0x06) >> 1
    if qos == 3:
        raise ValueError("QoS 3 is reserved")
    try:
        topic_len = (packet[0] << 8) | packet[1]
        if qos == 2 or topic_len == 0:
            return None
        pos = 2 + topic_len
        if pos > len(packet):
            raise ValueError("topic runs past the packet")
        # Never refused here: a topic no device may use is dead-lettered by the handler.
        topic = bytes(packet[2:pos]).decode("utf-8", "replace")
        mid = 0
        if qos:
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        if v5:
            # Property Length (a variable byte integer); the properties are not used.
            length = shift = 0
            while True:
                byte = packet[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed property length")
            pos += length
    except IndexError:
        raise ValueError("packet ends inside its variable header") from None
    if pos > len(packet):
        raise ValueError("properties run past the packet")
    return topic, mid, qos, bool(header & 0x01), pos


def _ignore(topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> None:
    """The handler of a closed :class:`DirectReader`."""


class DirectReader:
    """Manual ack, a direct message handler and pausable, buffered reads for one client.

    Create it before connecting: a persistent session's queued messages arrive right
    behind the CONNACK, and they must already be in manual-ack mode and reach
    ``handler`` rather than aiomqtt's queue. Call :meth:`start` once connected. All calls
    happen on the event loop thread, like every other paho call aiomqtt makes.
    """

    def __init__(self, client: aiomqtt.Client, handler: MessageHandler) -> None:
        self._aio = client
        self._paho: Any = cast(Any, client._client)  # noqa: SLF001
        self._handler = handler
        self._buf = b""
        self._pos = 0
        self._fd = -1
        self._sock: Any = None
        self._may_recv = False
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.paused = False
        # Whether the broker resumed our session (CONNACK session present): then it
        # redelivers whatever the previous connection left unacknowledged.
        self.session_present = False
        self._paho.manual_ack_set(True)
        self._paho.on_message = lambda _c, _u, m: handler(
            m.topic, m.payload, m.mid, m.qos, bool(m.retain)
        )
        aiomqtt_on_connect = self._paho.on_connect

        def on_connect(*args: Any) -> None:
            self.session_present = bool(getattr(args[2], "session_present", False))
            aiomqtt_on_connect(*args)

        self._paho.on_connect = on_connect
        in_packet = getattr(self._paho, "_in_packet", None)
        self._paho_handle_publish: Callable[[], int] | None = getattr(
            self._paho, "_handle_publish", None
        )
        if isinstance(in_packet, dict) and "packet" in in_packet and self._paho_handle_publish:
            self._v5 = is_v5(client)
            self._paho._handle_publish = self._handle_publish  # noqa: SLF001
        else:  # another paho: its own decoding, still with manual ack and this handler
            log.warning("paho internals changed; using its slower message path")

    def _handle_publish(self) -> int:
        """Decode an incoming PUBLISH (replaces paho's ``_handle_publish``).

        paho builds a format string, a ``Properties`` object, an ``MQTTMessage`` and a
        debug log record for every message: most of a consumer's CPU. Ingest needs the
        topic, payload, message id and QoS only. QoS 2 and topic aliases go to paho.
        """
        in_packet = self._paho._in_packet  # noqa: SLF001
        packet: bytearray = in_packet["packet"]
        try:
            decoded = decode_publish(in_packet["command"], packet, v5=self._v5)
        except ValueError as exc:
            # paho then closes the connection, as it does for its own protocol errors.
            log.error("malformed PUBLISH from the broker (%s); reconnecting", exc)
            return int(paho.MQTT_ERR_PROTOCOL)
        if decoded is None:
            assert self._paho_handle_publish is not None
            return int(self._paho_handle_publish())
        topic, mid, qos, retain, start = decoded
        self._handler(topic, bytes(memoryview(packet)[start:]), mid, qos, retain)
        return int(paho.MQTT_ERR_SUCCESS)

    def start(self) -> None:
        """Take over socket reads from aiomqtt (plain TCP; TLS keeps aiomqtt's reader)."""
        self._loop = asyncio.get_running_loop()
        sock = self._paho.socket()
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return
        self._sock = sock
        self._fd = sock.fileno()
        self._paho._sock_recv = self._recv  # noqa: SLF001
        self._loop.remove_reader(self._fd)
        if self.paused:
            self._hold_keepalive()
        else:
            self._loop.add_reader(self._fd, self._on_readable)

    def _recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            if not self._may_recv:
                # One socket read per readiness event: the loop gets back control after
                # at most READ_CHUNK_BYTES, so batches are sealed and written on time.
                raise BlockingIOError
            self._may_recv = False
            buf = self._sock.recv(READ_CHUNK_BYTES)  # BlockingIOError: no data yet
            if not buf:
                return b""
            self._buf, pos = buf, 0
        end = pos + bufsize
        self._pos = end
        return buf[pos:end]

    @property
    def _buffered(self) -> bool:
        return self._pos < len(self._buf)

    def _on_readable(self) -> None:
        self._may_recv = True
        try:
            while True:
                rc = self._paho.loop_read()
                if rc != paho.MQTT_ERR_SUCCESS or not self._buffered or self.paused:
                    break
        except Exception as exc:  # a broken socket ends this connection
            if not self._aio._disconnected.done():  # noqa: SLF001
                self._aio._disconnected.set_exception(exc)  # noqa: SLF001

    def ack(self, mid: int, qos: int) -> None:
        if qos:
            self._paho.ack(mid, qos)

    def close(self) -> None:
        """The connection is over: nothing more is read from its socket or handed to the
        handler (its message ids must never be acknowledged on a later connection), and
        the socket is closed if paho has not closed it (a disconnect we asked for, such
        as after a refused subscription, leaves it open)."""
        self._handler = _ignore
        self.paused = True
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        if self._socket_open():
            self._loop.remove_reader(self._fd)
        if self._paho.socket() is not None:
            self._paho._sock_close()  # noqa: SLF001

    def _socket_open(self) -> bool:
        # After paho closed the socket its descriptor number may belong to another file.
        return self._fd >= 0 and self._paho.socket() is self._sock

    def pause(self) -> None:
        """Stop reading: the socket fills and the broker holds the rest."""
        if not self.paused:
            self.paused = True
            if self._socket_open():
                self._loop.remove_reader(self._fd)
                self._hold_keepalive()

    def _hold_keepalive(self) -> None:
        """Keep a paused connection open. paho closes a connection whose PINGRESP it has
        not read within the keepalive, and a paused reader reads nothing: a pause longer
        than the keepalive (a database outage) would end the connection, and the
        broker would redeliver all it had sent. While paused, paho is told every third of
        the keepalive that no PINGRESP is outstanding: it goes on sending PINGREQs, which
        keep the broker's side open, and reads the answers on resume."""
        if self.paused and self._socket_open():
            self._paho._ping_t = 0  # noqa: SLF001
            interval = max(1.0, self._paho.keepalive / 3)
            self._keepalive_timer = self._loop.call_later(interval, self._hold_keepalive)

    def resume(self) -> None:
        if self.paused and self._socket_open():
            self.paused = False
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
                self._keepalive_timer = None
            self._loop.add_reader(self._fd, self._on_readable)
            if self._buffered:
                # Packets already read into the buffer do not wake the selector.
                self._loop.call_soon(self._on_readable)
