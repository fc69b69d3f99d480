"""One acknowledge-after-commit consumer of device messages, for ingest and rules.

    broker ──DirectReader──> the service's handler (on the event loop, no await)
                                   │ hold(): counted; reads pause above a bound
                                   ▼
                     the service writes and commits what it received
                                   │ acknowledge(generation, acks): PUBACK, only on the
                                   │ connection the messages came in on
                                   ▼ release(): reads resume below half of every bound

What both services need, done once:

* a persistent session under the replica's client id (the broker queues for it while the
  service is away), reconnected with jittered backoff;
* one policy for refused credentials: an error in the log and another try every
  :data:`AUTH_RETRY_SECONDS`, the service up and not ready meanwhile (an operator has to
  fix them; exiting would only make a crash loop);
* subscriptions that do not wait for their SUBACK: a resumed session's backlog arrives
  first and may fill the bounds, and a paused reader would never read the SUBACK; what
  an earlier release or share group left in the session is unsubscribed;
* a generation per connection: message ids mean nothing on a later connection, so a
  message received on an earlier one is never acknowledged (the broker redelivers it);
* bounded memory: everything held, from any connection, counts against the bounds;
* gauges that tell the truth at any moment (held, paused, connected), read when scraped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from fleetline import mqtt
from fleetline.settings import ConsumerSettings, MqttProtocol

log = logging.getLogger(__name__)

# After refused credentials, try again this rarely: an operator has to fix them.
AUTH_RETRY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Bounds:
    """Above any of these (0: none), reading from the broker pauses."""

    messages: int
    rows: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Gauges:
    held: Gauge
    paused: Gauge
    connected: Gauge


class AckConsumer:
    """The connection, the reads and the acknowledgements of one consuming service.

    ``handler`` gets every PUBLISH (topic, payload, message id, QoS, retain flag) and
    calls :meth:`hold` for what it keeps; the service calls :meth:`acknowledge` once
    that is committed and :meth:`release` once it no longer holds it.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        service: str,
        topics: list[str],
        handler: mqtt.MessageHandler,
        bounds: Bounds,
        gauges: Gauges,
        before_connect: Callable[[], Awaitable[None]] | None = None,
        previous_topics: Iterable[str] = (),
        previous_share_groups: Iterable[str] = (),
    ) -> None:
        self._settings = settings
        self._service = service
        self._topics = topics
        self._previous_topics = list(previous_topics)
        self._previous_share_groups = list(previous_share_groups)
        self._handler = handler
        self._bounds = bounds
        self._before_connect = before_connect
        self.generation = 0
        self.reader: mqtt.DirectReader | None = None
        self.client: mqtt.Client | None = None
        self.connected = False
        self._subacks: list[asyncio.Future[Any]] = []
        self.stopping = False
        self._attempt = 0
        self.held_messages = 0
        self.held_rows = 0
        self.held_bytes = 0
        gauges.held.set_function(lambda: self.held_messages)
        gauges.paused.set_function(lambda: int(self.paused))
        gauges.connected.set_function(lambda: int(self.connected))

    @property
    def paused(self) -> bool:
        return self.reader is not None and self.reader.paused

    @property
    def subscribed(self) -> bool:
        """Connected and subscribed (for readiness): the broker granted every
        subscription, or resumed our session, which holds them already (its backlog
        may fill the bounds and pause reads before the SUBACK is read)."""
        if not self.connected or self.reader is None:
            return False
        return self.reader.session_present or mqtt.granted(self._subacks)

    @property
    def session_lost(self) -> bool:
        """Connected, and the broker did not resume our session: it will not redeliver
        what an earlier connection left unacknowledged."""
        return self.connected and self.reader is not None and not self.reader.session_present

    # -- what the service holds ---------------------------------------------------------

    def hold(self, messages: int = 1, rows: int = 0, nbytes: int = 0) -> None:
        self.held_messages += messages
        self.held_rows += rows
        self.held_bytes += nbytes
        reader = self.reader
        if reader is not None and not reader.paused and self._over():
            reader.pause()
            log.info("pausing reads: %d messages held", self.held_messages)

    def release(self, messages: int, rows: int = 0, nbytes: int = 0) -> None:
        self.held_messages -= messages
        self.held_rows -= rows
        self.held_bytes -= nbytes
        reader = self.reader
        if reader is not None and reader.paused and not self.stopping and self._below_half():
            reader.resume()

    def _over(self) -> bool:
        b = self._bounds
        return (
            self.held_messages >= b.messages
            or (b.rows > 0 and self.held_rows >= b.rows)
            or (b.bytes > 0 and self.held_bytes >= b.bytes)
        )

    def _below_half(self) -> bool:
        b = self._bounds
        return (
            self.held_messages < b.messages // 2
            and (b.rows == 0 or self.held_rows < b.rows // 2)
            and (b.bytes == 0 or self.held_bytes < b.bytes // 2)
        )

    # -- acknowledging ------------------------------------------------------------------

    def is_live(self, generation: int) -> bool:
        """Messages of ``generation`` can still be acknowledged."""
        return self.connected and generation == self.generation

    def acknowledge(self, generation: int, acks: Iterable[tuple[int, int]]) -> bool:
        """PUBACK each (message id, QoS) received on connection ``generation``; False
        (nothing sent) when that connection is gone: the broker redelivers them."""
        reader = self.reader
        if reader is None or not self.is_live(generation):
            return False
        for mid, qos in acks:
            reader.ack(mid, qos)
        return True

    def stop_reading(self) -> None:
        """For shutdown: read nothing more, and do not connect again."""
        self.stopping = True
        if self.reader is not None:
            self.reader.pause()

    # -- the connection -----------------------------------------------------------------

    def _make_client(self, protocol: MqttProtocol) -> mqtt.Client:
        return mqtt.consumer_client(self._settings, protocol)

    def _prepare(self, client: mqtt.Client) -> None:
        self.generation += 1
        self.reader = mqtt.DirectReader(client, self._handler)

    async def run(self) -> None:
        """Stay connected until cancelled (or :meth:`stop_reading`)."""
        while True:
            if self._before_connect is not None:
                await self._before_connect()
            if self.stopping:
                return
            try:
                async with mqtt.connected(
                    self._make_client, self._settings.mqtt_protocol, prepare=self._prepare
                ) as client:
                    await self._serve(client)
                    log.warning("broker closed the connection")
                delay = mqtt.backoff_seconds(0)
            except mqtt.MqttAuthError as exc:
                log.error(
                    "the broker refused %s's credentials (%s); trying again in %.0f s",
                    self._service,
                    exc,
                    AUTH_RETRY_SECONDS,
                )
                delay = AUTH_RETRY_SECONDS
            except mqtt.MqttError as exc:
                log.warning("MQTT connection lost or refused: %s", exc)
                delay = mqtt.backoff_seconds(self._attempt)
                self._attempt += 1
            finally:
                self.connected = False
                self._subacks = []
                self.client = None
                if self.reader is not None:
                    self.reader.close()
                self.reader = None
            await asyncio.sleep(delay)

    def _superseded(self, client: mqtt.Client, topics: list[str]) -> list[str]:
        """What a persistent session may still hold from an earlier release or setting:
        the previous topics, and today's, plain and in the share groups used before. A
        session that kept them would receive messages twice."""
        groups = {"", self._settings.share_group, *self._previous_share_groups}
        plain = [*self._topics, *self._previous_topics]
        every = {t for group in groups for t in mqtt.shared(client, group, plain)}
        return sorted(every - set(topics))

    async def _serve(self, client: mqtt.Client) -> None:
        reader = self.reader
        assert reader is not None
        reader.start()
        if self._over() or self.stopping:
            reader.pause()  # what earlier connections left is still held
        elif reader.paused:
            reader.resume()  # paused before the socket opened, released since
        # Acknowledgements are valid from the CONNACK on: a resumed session's backlog is
        # already arriving.
        self.client = client
        self.connected = True
        self._attempt = 0
        if self.generation > 1 and not reader.session_present:
            log.error(
                "the broker did not resume %s's session: messages it queued or had in "
                "flight for it are lost (is its persistence on, and the session expiry "
                "long enough?)",
                self._service,
            )
        topics = mqtt.shared(client, self._settings.share_group, self._topics)
        self._subacks = mqtt.subscribe_nowait(client, topics, qos=1)
        superseded = self._superseded(client, topics)
        if superseded:
            mqtt.unsubscribe_nowait(client, superseded)
        if not mqtt.is_v5(client) and self._settings.share_group:
            log.warning(
                "MQTT 3.1.1: plain subscription, no shared group; run a single %s "
                "replica (each replica would receive every message)",
                self._service,
            )
        log.info(
            "connected to the broker, subscribed",
            extra={
                "topics": topics,
                "client_id": self._settings.client_id,
                "mqtt": "5" if mqtt.is_v5(client) else "3.1.1",
            },
        )
        await mqtt.wait_disconnected(client)
