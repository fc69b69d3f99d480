"""Fan-out of stored events (fleetline.streamevents) to the WebSocket clients of /v1/stream.

One database connection per API process LISTENs on the stream channel. Each client has
a bounded queue and its own sender task (a slow client never delays the others); a
client whose queue fills is dropped with close code 1013, so memory stays bounded by
``clients x queue size``. Events of devices that are not registered are not streamed,
as the REST API does not serve them either.
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
from typing import Any

import asyncpg
import orjson
from prometheus_client import Counter, Gauge

from fleetline import db, streamevents

log = logging.getLogger(__name__)

# How long a device's registration and tags are trusted before they are read again.
TAGS_TTL_SECONDS = 15.0
TAGS_CACHE_MAX = 200_000
# Notifications waiting for the dispatcher; beyond this the stream is lagging.
BACKLOG_MAX = 10_000
# A new client waits at most this long for ingest to learn that this process listens.
ANNOUNCE_TIMEOUT_SECONDS = 5.0
ANNOUNCE = """
INSERT INTO stream_listeners (listener_id, expires_at)
VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (listener_id) DO UPDATE SET expires_at = excluded.expires_at
"""
WITHDRAW = "DELETE FROM stream_listeners WHERE listener_id = $1"

CLIENTS = Gauge("fleetline_api_stream_clients", "WebSocket clients of /v1/stream")
EVENTS = Counter("fleetline_api_stream_events_total", "Events sent to stream clients")
DROPPED = Counter(
    "fleetline_api_stream_dropped_clients_total",
    "Stream clients closed because they could not keep up",
    ["reason"],
)


@dataclass(frozen=True)
class StreamFilter:
    devices: frozenset[str] = frozenset()
    tags: dict[str, str] = field(default_factory=dict)
    metrics: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset({"telemetry", "status", "alarm"})

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
    def __init__(self, dsn: str, pool: asyncpg.Pool[Any]) -> None:
        self._dsn = dsn
        self._pool = pool
        self._subs: set[Subscription] = set()
        self._backlog: asyncio.Queue[str] = asyncio.Queue(maxsize=BACKLOG_MAX)
        # device id -> (tags, or None when not registered; when read)
        self._devices: dict[str, tuple[dict[str, Any] | None, float]] = {}
        self.listening = False
        # Presence in stream_listeners, which makes ingest announce its batches.
        self._listener_id = f"api-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._announced_at: float | None = None
        self._announced = asyncio.Event()
        self._presence_wake = asyncio.Event()

    @property
    def clients(self) -> int:
        return len(self._subs)

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

    def _on_notify(self, _con: object, _pid: int, _channel: str, payload: object) -> None:
        if not self._subs or not isinstance(payload, str):
            return
        try:
            self._backlog.put_nowait(payload)
        except asyncio.QueueFull:
            # The dispatcher is behind: every client would miss events. Tell them.
            for sub in list(self._subs):
                DROPPED.labels("lagging").inc()
                sub.close(1013, "the stream is lagging behind the database; reconnect")

    async def run(self) -> None:
        """Listen (reconnecting with backoff) and dispatch, until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._dispatch(), name="api.stream.dispatch")
                tg.create_task(self._listen(), name="api.stream.listen")
                tg.create_task(self._presence(), name="api.stream.presence")
        finally:
            if self._announced_at is not None:
                with contextlib.suppress(Exception):
                    await self._pool.execute(WITHDRAW, self._listener_id, timeout=2)

    async def announced(self) -> None:
        """Wait until ingest has had time to see that this process listens (bounded: with
        the database down, the client starts anyway and the stream closes it)."""
        self._presence_wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANNOUNCE_TIMEOUT_SECONDS):
                await self._announced.wait()
                assert self._announced_at is not None
                settle = self._announced_at + streamevents.LISTENER_SETTLE_SECONDS
                await asyncio.sleep(max(0.0, settle - time.monotonic()))

    async def _presence(self) -> None:
        while True:
            # Cleared before the work: a client arriving during it wakes the next round.
            self._presence_wake.clear()
            try:
                if self._subs:
                    await self._pool.execute(
                        ANNOUNCE,
                        self._listener_id,
                        streamevents.LISTENER_TTL_SECONDS,
                        timeout=5,
                    )
                    if self._announced_at is None:
                        self._announced_at = time.monotonic()
                        self._announced.set()
                elif self._announced_at is not None:
                    # Not announced from here on, so a client arriving meanwhile waits
                    # for the next round's announcement instead of trusting this one.
                    self._announced_at = None
                    self._announced.clear()
                    await self._pool.execute(WITHDRAW, self._listener_id, timeout=5)
                    if self._subs:
                        continue
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not record stream presence: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._presence_wake.wait(), streamevents.LISTENER_REFRESH_SECONDS
                )

    async def _listen(self) -> None:
        await db.listen(
            self._dsn,
            streamevents.CHANNEL,
            self._on_notify,
            on_listening=self._listening,
            on_lost=self._lost,
        )

    def _listening(self) -> None:
        self.listening = True
        log.info("listening for stored events on %s", streamevents.CHANNEL)

    def _lost(self) -> None:
        if not self.listening:
            return
        self.listening = False
        # Events committed while not listening are gone: clients must know.
        for sub in list(self._subs):
            sub.close(1011, "the stream lost its database connection; reconnect")

    async def _dispatch(self) -> None:
        while True:
            payload = await self._backlog.get()
            try:
                await self._dispatch_one(payload)
            except Exception:  # one odd notification must not end the stream
                log.exception("could not dispatch a stream notification")

    async def _dispatch_one(self, payload: str) -> None:
        if not self._subs:
            return
        try:
            events = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("ignoring a malformed stream notification")
            return
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            log.warning("ignoring a stream notification that is not a list of events")
            return
        ids = {e.get("device_id") for e in events if isinstance(e.get("device_id"), str)}
        tags = await self._device_tags(ids)
        for event in events:
            device_tags = tags.get(event.get("device_id"))
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
                rows = await self._pool.fetch(
                    "SELECT id, tags FROM devices WHERE id = ANY($1::text[])", missing, timeout=5
                )
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
