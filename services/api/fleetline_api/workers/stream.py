"""Fan-out of stored events (fleetline.streamevents) to the WebSocket clients of /v1/stream.

Each API process with stream clients takes readings and status changes from the broker
(ingest publishes them after commit on ``fleetline/stream/events``) over a connection of
its own, and alarm events from PostgreSQL (one connection LISTENs on the stream
channel). While it has clients it keeps a retained presence message under
``fleetline/stream/listeners/``, which tells ingest to publish; its Last Will clears it.
Each client has a bounded queue and its own sender task (a slow client never delays the
others); a client whose queue fills is dropped with close code 1013, so memory stays
bounded by ``clients x queue size`` plus :data:`BACKLOG_MAX_BYTES`. Clients are closed
too when events were lost on the way (a gap in a publisher's sequence numbers, the
broker or the database connection gone), so none is left believing it saw everything.
Events of devices that are not registered are not streamed, as the REST API does not
serve them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import orjson
from prometheus_client import Counter, Gauge

from fleetline import db, mqtt, streamevents
from fleetline.settings import MqttProtocol
from fleetline_api.queries import stream as sql
from fleetline_api.settings import ApiSettings

log = logging.getLogger(__name__)

# How long a device's registration and tags are trusted before they are read again.
TAGS_TTL_SECONDS = 15.0
TAGS_CACHE_MAX = 200_000
# Event payloads waiting for the dispatcher; beyond this the stream is lagging.
BACKLOG_MAX_BYTES = 32 * 1024 * 1024
# A new client waits at most this long for ingest to answer this process's presence.
ANNOUNCE_TIMEOUT_SECONDS = 5.0
# After refused credentials, retry this rarely: an operator has to fix them.
AUTH_RETRY_SECONDS = 30.0
# Where a payload waiting for the dispatcher came from: alarm notifications (database),
# ingest's events, or ingest's answer to this process's presence (broker).
Source = Literal["alarms", "events", "heard"]

CLIENTS = Gauge("fleetline_api_stream_clients", "WebSocket clients of /v1/stream")
EVENTS = Counter("fleetline_api_stream_events_total", "Events sent to stream clients")
DROPPED = Counter(
    "fleetline_api_stream_dropped_clients_total",
    "Stream clients closed by the server: slow (the client could not keep up), lagging "
    "(this process fell behind), gap (events lost on the way), lost (a source's "
    "connection ended)",
    ["reason"],
)


@dataclass(frozen=True)
class StreamFilter:
    devices: frozenset[str] = frozenset()
    tags: dict[str, str] = field(default_factory=dict)
    metrics: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset({"telemetry", "status", "alarm", "file"})

    def select(self, event: dict[str, Any], tags: dict[str, Any]) -> dict[str, Any] | None:
        """The event as this client sees it (its metrics only), or None."""
        if event.get("type") not in self.types:
            return None
        if self.devices and event.get("device_id") not in self.devices:
            return None
        if self.tags and any(tags.get(k) != v for k, v in self.tags.items()):
            return None
        if self.metrics and event.get("type") == "telemetry":
            values = {k: v for k, v in event["values"].items() if k in self.metrics}
            if not values:
                return None
            return {**event, "values": values}
        return event


class Subscription:
    def __init__(self, hub: StreamHub, wanted: StreamFilter, queue_size: int) -> None:
        self.hub = hub
        self.filter = wanted
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        # Set when the client must go: (close code, reason).
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def offer(self, encoded: bytes) -> None:
        if self.closed.done():
            return
        try:
            self.queue.put_nowait(encoded)
        except asyncio.QueueFull:
            DROPPED.labels("slow").inc()
            self.close(1013, "client too slow: events were arriving faster than it read")

    def close(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))

    async def events(self) -> AsyncIterator[bytes]:
        """Encoded events until the subscription closes."""
        while not self.closed.done():
            getter = asyncio.ensure_future(self.queue.get())
            try:
                waited: set[asyncio.Future[Any]] = {getter, self.closed}
                await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():  # closed, or the sender was cancelled
                    getter.cancel()
            if getter.cancelled():
                return
            yield getter.result()


class StreamHub:
    def __init__(self, settings: ApiSettings, pool: asyncpg.Pool[Any]) -> None:
        self._settings = settings
        self._pool = pool
        self._subs: set[Subscription] = set()
        # (epoch, source, payload) waiting for the dispatcher, and their size.
        self._backlog: asyncio.Queue[tuple[int, Source, bytes]] = asyncio.Queue()
        self._backlog_bytes = 0
        # device id -> (tags, or None when not registered; when read)
        self._devices: dict[str, tuple[dict[str, Any] | None, float]] = {}
        self._db_listening = False
        self._client: mqtt.Client | None = None
        self.listener_id = f"api-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._presence_topic = f"{streamevents.LISTENERS_TOPIC}/{self.listener_id}"
        self._heard_topic = f"{streamevents.HEARD_TOPIC}/{self.listener_id}"
        # Set once an ingest answered this presence (its token) with where to count from.
        self._heard = asyncio.Event()
        self._token = ""
        self._present = False  # presence published, and not withdrawn since
        self._presence_wake = asyncio.Event()
        # Each publisher's last sequence number seen in the current epoch. The epoch
        # moves on whenever messages are passed over on purpose (no clients then, or a new
        # subscription): a gap across epochs loses no client an event.
        self._epoch = 0
        self._seqs_epoch = 0
        self._seqs: dict[str, int] = {}

    @property
    def clients(self) -> int:
        return len(self._subs)

    @property
    def listening(self) -> bool:
        """Both sources are connected: the database (alarms) and the broker (the rest)."""
        return self._db_listening and self._client is not None

    @contextlib.contextmanager
    def subscribe(self, wanted: StreamFilter, *, queue_size: int) -> Any:
        sub = Subscription(self, wanted, queue_size)
        self._subs.add(sub)
        CLIENTS.set(len(self._subs))
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            CLIENTS.set(len(self._subs))
            if not self._subs:
                self._presence_wake.set()

    def _close_all(self, code: int, reason: str, why: str) -> None:
        for sub in list(self._subs):
            DROPPED.labels(why).inc()
            sub.close(code, reason)

    def _enqueue(self, source: Source, payload: bytes) -> None:
        if not self._subs:
            self._epoch += 1
            return
        if self._backlog_bytes + len(payload) > BACKLOG_MAX_BYTES:
            # The dispatcher is behind: every client would miss events. Tell them.
            self._close_all(1013, "the stream is lagging behind; reconnect", "lagging")
            self._epoch += 1  # every client that could miss this one is closed
            return
        self._backlog_bytes += len(payload)
        self._backlog.put_nowait((self._epoch, source, payload))

    def _on_notify(self, _con: object, _pid: int, _channel: str, payload: object) -> None:
        if isinstance(payload, str):
            self._enqueue("alarms", payload.encode())

    async def run(self) -> None:
        """Listen on both sources (reconnecting with backoff) and dispatch, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._dispatch(), name="api.stream.dispatch")
            tg.create_task(self._listen(), name="api.stream.listen")
            tg.create_task(self._broker(), name="api.stream.broker")

    async def announced(self) -> None:
        """Wait until ingest has answered this process's presence (bounded: with no
        ingest running, or the broker away, the client starts anyway)."""
        self._presence_wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANNOUNCE_TIMEOUT_SECONDS):
                await self._heard.wait()

    # -- the broker: presence, readings and status changes ------------------------------

    def _make(self, protocol: MqttProtocol) -> mqtt.Client:
        return mqtt.make_client(
            self._settings.mqtt,
            identifier=f"fleetline-{self.listener_id}",
            protocol=protocol,
            persistent=False,
            # Ingest stops publishing for this process when it dies.
            will=mqtt.Will(self._presence_topic, b"", qos=1, retain=True),
        )

    async def _broker(self) -> None:
        attempt = 0
        while True:
            try:
                async with mqtt.connected(self._make, self._settings.mqtt_protocol) as client:
                    await client.subscribe(self._heard_topic, qos=0)
                    self._client = client
                    attempt = 0
                    await self._serve(client)
            except mqtt.MqttAuthError as exc:
                log.error("the broker refused the stream's credentials: %s", exc)
                await asyncio.sleep(AUTH_RETRY_SECONDS)
                continue
            except mqtt.MqttError as exc:
                log.warning("stream's broker connection lost: %s", exc)
            except Exception:  # a bug here must not leave the stream without a broker
                log.exception("stream's broker connection failed; reconnecting")
            finally:
                self._present = False  # withdrawn, or cleared by the Will
                if self._client is not None:
                    self._client = None
                    self._heard.clear()
                    # Events published meanwhile are gone: clients must know.
                    self._close_all(
                        1011, "the stream lost its broker connection; reconnect", "lost"
                    )
            await asyncio.sleep(mqtt.backoff_seconds(attempt))
            attempt += 1

    async def _serve(self, client: mqtt.Client) -> None:
        await mqtt.serve(
            client,
            {
                "api.stream.receive": self._receive(client),
                "api.stream.presence": self._presence(client),
            },
        )

    async def _receive(self, client: mqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            if message.topic.value == self._heard_topic:
                self._enqueue("heard", raw)  # in order with the events around it
            elif message.topic.value == streamevents.EVENTS_TOPIC:
                self._enqueue("events", raw)

    async def _presence(self, client: mqtt.Client) -> None:
        """While there are clients: subscribed to the events, presence retained and
        refreshed. Without: neither."""
        try:
            await self._keep_presence(client)
        finally:
            if self._present:
                # Shutting down: a clean disconnect sends no Will, so withdraw here.
                with contextlib.suppress(mqtt.MqttError, TimeoutError):
                    async with asyncio.timeout(2):
                        await client.publish(self._presence_topic, b"", qos=1, retain=True)

    async def _keep_presence(self, client: mqtt.Client) -> None:
        subscribed = False
        while True:
            # Cleared before the work: a client arriving during it wakes the next round.
            self._presence_wake.clear()
            if self._subs:
                if not subscribed:
                    self._epoch += 1  # sequence numbers count from what comes now
                    await client.subscribe(streamevents.EVENTS_TOPIC, qos=0)
                    subscribed = True
                    self._token = secrets.token_hex(8)
                    self._heard.clear()
                self._present = True
                await client.publish(
                    self._presence_topic,
                    self._token.encode(),
                    qos=1,
                    retain=True,
                    # A presence a dead process left behind runs out on its own.
                    properties=mqtt.publish_properties(
                        client, expiry_seconds=streamevents.LISTENER_TTL_SECONDS
                    ),
                )
            elif subscribed:
                subscribed = False
                self._heard.clear()
                await client.publish(self._presence_topic, b"", qos=1, retain=True)
                self._present = False
                await client.unsubscribe(streamevents.EVENTS_TOPIC)
                if self._subs:
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._presence_wake.wait(), streamevents.LISTENER_REFRESH_SECONDS
                )

    # -- the database: alarms ------------------------------------------------------------

    async def _listen(self) -> None:
        await db.listen(
            self._settings.dsn,
            streamevents.CHANNEL,
            self._on_notify,
            on_listening=self._listening,
            on_lost=self._lost,
        )

    def _listening(self) -> None:
        self._db_listening = True
        log.info("listening for alarm events on %s", streamevents.CHANNEL)

    def _lost(self) -> None:
        if not self._db_listening:
            return
        self._db_listening = False
        # Events committed while not listening are gone: clients must know.
        self._close_all(1011, "the stream lost its database connection; reconnect", "lost")

    # -- dispatching -----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            epoch, source, payload = await self._backlog.get()
            self._backlog_bytes -= len(payload)
            try:
                await self._dispatch_one(epoch, source, payload)
            except Exception:  # one odd message must not end the stream
                log.exception("could not dispatch stream events")

    def _count_from(self, epoch: int) -> None:
        """Sequence numbers seen in an earlier epoch say nothing about this one."""
        if epoch != self._seqs_epoch:
            self._seqs_epoch = epoch
            self._seqs.clear()

    def _take_heard(self, epoch: int, payload: bytes) -> None:
        """An ingest answered a presence: count its messages from the number it gave."""
        read = streamevents.read_heard(payload)
        if read is None or read[2] != self._token:
            return  # malformed, or the answer to an earlier presence
        publisher, seq, _token = read
        self._count_from(epoch)
        self._seqs.setdefault(publisher, seq - 1)
        self._heard.set()

    def _events(self, epoch: int, source: Source, payload: bytes) -> list[dict[str, Any]] | None:
        if source == "alarms":
            try:
                events = orjson.loads(payload)
            except orjson.JSONDecodeError:
                events = None
            if isinstance(events, list) and all(isinstance(e, dict) for e in events):
                return events
            log.warning("ignoring a malformed alarm notification")
            return None
        read = streamevents.read_message(payload)
        if read is None:
            log.warning("ignoring a malformed message on %s", streamevents.EVENTS_TOPIC)
            return None
        publisher, seq, events = read
        self._count_from(epoch)
        last = self._seqs.get(publisher)
        self._seqs[publisher] = seq
        if last is not None and seq != last + 1:
            if seq > last + 1:
                log.warning("stream events from %s lost: %d messages", publisher, seq - last - 1)
            else:
                log.warning("stream publisher %s started again; events may be lost", publisher)
            self._close_all(1013, "the stream missed events on the way; reconnect", "gap")
        return events

    async def _dispatch_one(self, epoch: int, source: Source, payload: bytes) -> None:
        if source == "heard":
            self._take_heard(epoch, payload)
            return
        # Read even without clients: the sequence numbers must stay current.
        events = self._events(epoch, source, payload)
        if not events or not self._subs:
            return
        ids = {d for e in events if isinstance(d := e.get("device_id"), str)}
        tags = await self._device_tags(ids)
        for event in events:
            device_id = event.get("device_id")
            device_tags = tags.get(device_id) if isinstance(device_id, str) else None
            if device_tags is None:
                continue
            encoded_for_all: bytes | None = None
            for sub in list(self._subs):
                view = sub.filter.select(event, device_tags)
                if view is None:
                    continue
                if view is event:
                    if encoded_for_all is None:
                        encoded_for_all = orjson.dumps(event)
                    sub.offer(encoded_for_all)
                else:
                    sub.offer(orjson.dumps(view))
                EVENTS.inc()

    async def _device_tags(self, ids: set[str]) -> dict[str, dict[str, Any] | None]:
        now = time.monotonic()
        found: dict[str, dict[str, Any] | None] = {}
        missing: list[str] = []
        for device_id in ids:
            if not isinstance(device_id, str):
                continue
            cached = self._devices.get(device_id)
            if cached is not None and now - cached[1] < TAGS_TTL_SECONDS:
                found[device_id] = cached[0]
            else:
                missing.append(device_id)
        if missing:
            try:
                rows = await self._pool.fetch(sql.DEVICE_TAGS, missing, timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("stream could not read device tags: %s", exc)
                rows = []
                for device_id in missing:  # serve what we knew, stale, rather than nothing
                    cached = self._devices.get(device_id)
                    if cached is not None:
                        found[device_id] = cached[0]
                return found
            known = {r["id"]: r["tags"] for r in rows}
            if len(self._devices) + len(missing) > TAGS_CACHE_MAX:
                self._devices.clear()
            for device_id in missing:
                tags = known.get(device_id)
                if isinstance(tags, str):  # a pool without the jsonb codec
                    tags = orjson.loads(tags)
                self._devices[device_id] = (tags, now)
                found[device_id] = tags
        return found
