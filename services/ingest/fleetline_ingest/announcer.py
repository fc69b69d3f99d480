"""Stored events for the API's ``/v1/stream``, published on the broker after commit.

Writers hand each committed batch over with :meth:`StreamAnnouncer.offer`, which costs
nothing while no API process listens, and otherwise queues the batch's rows (at most
:data:`MAX_QUEUED_BATCHES`; beyond, batches go unannounced and are counted). One task
encodes them (fleetline/streamevents.py: the API builds the events) and publishes them,
QoS 0, on ingest's
side connection to the broker, which also tells who listens: retained messages under
``fleetline/stream/listeners/``, each forgotten after its time to live unless refreshed.
A listener heard of for the first time is answered on ``fleetline/stream/heard/{id}``,
after what was queued before it: its first client is told it is subscribed then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from fleetline import mqtt, streamevents
from fleetline.protocol import Row
from fleetline_ingest import metrics

log = logging.getLogger(__name__)

MAX_QUEUED_BATCHES = 16
PUBLISH_TIMEOUT_SECONDS = 5.0
TOPICS = [f"{streamevents.LISTENERS_TOPIC}/+"]

# A batch's rows and status changes, or the id of a listener to answer.
_Item = tuple[list[Row], dict[str, tuple[bool, datetime]]] | str


class StreamAnnouncer:
    def __init__(self, publisher: str, *, enabled: bool = True) -> None:
        self.publisher = publisher
        self.enabled = enabled
        self._listeners: dict[str, float] = {}  # listener id -> when last heard of
        self._client: mqtt.Client | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=MAX_QUEUED_BATCHES)
        self._seq = 0
        self._dropped_since_logged = 0

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
        self._client = client
        self._listeners.clear()
        metrics.STREAM_LISTENERS.set(0)

    def observe(self, topic: str, payload: bytes) -> None:
        """A listener's presence (non-empty payload) or its withdrawal (empty)."""
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
                self._put(listener)
        metrics.STREAM_LISTENERS.set(len(self._listeners))

    def offer(self, rows: list[Row], status: dict[str, tuple[bool, datetime]]) -> None:
        """A committed batch: announced if anyone listens."""
        if (rows or status) and self.listening:
            self._put((rows, status))

    def _put(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped(1)

    def _dropped(self, messages: int) -> None:
        # A number skipped: subscribers see the gap and tell their clients.
        self._seq += 1
        metrics.STREAM_MESSAGES.labels("dropped").inc(messages)
        if self._dropped_since_logged == 0:
            log.warning("stream events dropped: the broker link is down or behind")
        self._dropped_since_logged += messages

    async def run(self) -> None:
        while True:
            item = await self._queue.get()
            client = self._client
            if client is None:
                self._dropped(1)
                continue
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                    if isinstance(item, str):
                        await client.publish(f"{streamevents.HEARD_TOPIC}/{item}", b"1", qos=0)
                        continue
                    rows, status = item
                    for body in streamevents.batch_parts(rows, status):
                        payload = streamevents.message(self.publisher, self._seq, body)
                        self._seq += 1
                        await client.publish(streamevents.EVENTS_TOPIC, payload, qos=0)
                        metrics.STREAM_MESSAGES.labels("published").inc()
                self._dropped_since_logged = 0
            except (mqtt.MqttError, TimeoutError) as exc:
                log.warning("could not publish stream events: %s", exc)
                self._dropped(1)
