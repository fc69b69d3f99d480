"""Stored events for the API's ``/v1/stream``, published on the broker after commit.

Writers hand each committed batch over with :meth:`StreamAnnouncer.offer`, which costs
nothing while no API process listens, and otherwise queues the batch's rows (at most
:data:`MAX_QUEUED_BATCHES`; beyond, batches go unannounced and are counted). One task
encodes them (fleetline/streamevents.py: the API builds the events) and publishes them,
QoS 0, on ingest's
side connection to the broker, which also tells who listens: retained messages under
``fleetline/stream/listeners/``, each forgotten after its time to live unless refreshed.
A listener heard of for the first time is answered on ``fleetline/stream/heard/{id}``
with the number of the next message, after what was queued before it: the listener
counts from there, and its first client is told it is subscribed then. Every loss
(a full queue, a failed publish, the side connection down while listeners were known)
skips a number, which subscribers see as a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import cast

from fleetline import mqtt, streamevents
from fleetline.protocol import Row
from fleetline_ingest import metrics

log = logging.getLogger(__name__)

MAX_QUEUED_BATCHES = 16
PUBLISH_TIMEOUT_SECONDS = 5.0
TOPICS = [f"{streamevents.LISTENERS_TOPIC}/+"]

# A batch's rows and status changes, or a listener to answer: (listener id, its token).
_Batch = tuple[list[Row], dict[str, tuple[bool, datetime]]]
_Answer = tuple[str, str]


class StreamAnnouncer:
    def __init__(self, publisher: str, *, enabled: bool = True) -> None:
        self.publisher = publisher
        self.enabled = enabled
        self._listeners: dict[str, float] = {}  # listener id -> when last heard of
        self._client: mqtt.Client | None = None
        self._queue: asyncio.Queue[_Batch | _Answer] = asyncio.Queue(maxsize=MAX_QUEUED_BATCHES)
        # The number of the next message; a number skipped tells subscribers of a loss.
        self._seq = 0
        self._drop_logged = False  # a warning per run of losses, not per loss

    @property
    def listening(self) -> bool:
        if not self.enabled or self._client is None or not self._listeners:
            return False
        oldest = time.monotonic() - streamevents.LISTENER_TTL_SECONDS
        for listener, heard in list(self._listeners.items()):
            if heard < oldest:
                log.info("stream listener %s expired", listener)
                del self._listeners[listener]
        metrics.STREAM_LISTENERS.set(len(self._listeners))
        return bool(self._listeners)

    def connection(self, client: mqtt.Client | None) -> None:
        """The side connection is up (subscribed; retained presence follows) or gone."""
        if client is None and self._listeners:
            # Batches committed until the listeners are known again go unannounced.
            self._seq += 1
        self._client = client
        self._listeners.clear()
        metrics.STREAM_LISTENERS.set(0)

    def observe(self, topic: str, payload: bytes) -> None:
        """A listener's presence (its token) or its withdrawal (empty)."""
        listener = topic.removeprefix(streamevents.LISTENERS_TOPIC + "/")
        if listener == topic or not listener or "/" in listener:
            return
        if not payload:
            if self._listeners.pop(listener, None) is not None:
                log.info("stream listener %s gone", listener)
        else:
            new = listener not in self._listeners
            self._listeners[listener] = time.monotonic()
            if new and self.enabled:
                log.info("stream listener %s present", listener)
                token = payload[:64].decode(errors="replace")
                try:
                    self._queue.put_nowait((listener, token))
                except asyncio.QueueFull:  # it waits out its timeout instead
                    log.warning("could not answer stream listener %s: queue full", listener)
        metrics.STREAM_LISTENERS.set(len(self._listeners))

    def offer(self, rows: list[Row], status: dict[str, tuple[bool, datetime]]) -> None:
        """A committed batch: announced if anyone listens."""
        if (rows or status) and self.listening:
            try:
                self._queue.put_nowait((rows, status))
            except asyncio.QueueFull:
                self._dropped()

    def _dropped(self) -> None:
        self._seq += 1
        metrics.STREAM_MESSAGES.labels("dropped").inc()
        if not self._drop_logged:
            log.warning("stream events dropped: the broker link is down or behind")
            self._drop_logged = True

    async def flush(self, timeout: float) -> None:
        """At shutdown, after the last commit: publish what is queued (bounded)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()

    async def run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._publish(item)
            finally:
                self._queue.task_done()

    async def _publish(self, item: _Batch | _Answer) -> None:
        client = self._client
        answer = isinstance(item[0], str)
        if client is None:
            if not answer:
                self._dropped()
            return
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                if answer:
                    listener, token = cast(_Answer, item)
                    await client.publish(
                        f"{streamevents.HEARD_TOPIC}/{listener}",
                        streamevents.heard(self.publisher, self._seq, token),
                        qos=0,
                    )
                    return
                rows, status = cast(_Batch, item)
                for body in streamevents.batch_parts(rows, status):
                    payload = streamevents.message(self.publisher, self._seq, body)
                    self._seq += 1
                    await client.publish(streamevents.EVENTS_TOPIC, payload, qos=0)
                    metrics.STREAM_MESSAGES.labels("published").inc()
            self._drop_logged = False
        except (mqtt.MqttError, TimeoutError) as exc:
            log.warning("could not publish stream events: %s", exc)
            if not answer:
                self._dropped()
        except Exception:  # a bug here must not end ingest: the stream is told of a loss
            log.exception("could not publish stream events")
            if not answer:
                self._dropped()
