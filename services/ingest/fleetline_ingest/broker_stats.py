"""What the broker says of itself (``$SYS``), as metrics and log lines.

Mosquitto drops a QoS 1 message it already acknowledged to a device when the receiving
session's queue is at ``max_queued_messages``: during a long database outage that is
ingest's session. That must never happen silently, so ingest subscribes to the broker's
own counters, over a connection of its own (its consumer's reads are paused exactly
when the queue grows), exports them (``fleetline_broker_*``), and logs an error each
time the dropped count grows. The count is the whole broker's: any session at its cap
(ingest's, rules', a stalled subscriber's) raises it. The same side connection carries
the live stream's events and listeners (fleetline_ingest/announcer.py).
"""

from __future__ import annotations

import logging

from fleetline import mqtt
from fleetline.settings import MqttProtocol
from fleetline_ingest import metrics
from fleetline_ingest.announcer import TOPICS as STREAM_TOPICS
from fleetline_ingest.announcer import StreamAnnouncer
from fleetline_ingest.settings import IngestSettings

log = logging.getLogger(__name__)

DROPPED = "$SYS/broker/publish/messages/dropped"
STORED = "$SYS/broker/store/messages/count"
TOPICS = [DROPPED, STORED]


class BrokerStats:
    def __init__(self) -> None:
        self.dropped: int | None = None

    def observe(self, topic: str, payload: bytes) -> None:
        try:
            value = int(payload)
        except ValueError:
            return
        if topic == STORED:
            metrics.BROKER_STORED.set(value)
        elif topic == DROPPED:
            metrics.BROKER_DROPPED.set(value)
            if self.dropped is None:
                # The first count covers the broker's whole run, before ingest looked.
                if value:
                    log.warning(
                        "the broker has dropped %d messages since it started",
                        value,
                        extra={"broker_dropped_total": value},
                    )
            else:
                # The count starts again at 0 when the broker restarts.
                grown = value - self.dropped if value >= self.dropped else value
                if grown > 0:
                    metrics.BROKER_DROPS_SEEN.inc(grown)
                    log.error(
                        "the broker dropped %d messages it had accepted (a session's queue "
                        "was at max_queued_messages): if ingest's, readings were lost",
                        grown,
                        extra={"broker_dropped_total": value},
                    )
            self.dropped = value


async def watch(settings: IngestSettings, announcer: StreamAnnouncer) -> None:
    """Ingest's side connection, for as long as ingest runs: the broker's counters, and
    the stream's listeners and events (fleetline_ingest/announcer.py)."""
    stats = BrokerStats()

    def make(protocol: MqttProtocol) -> mqtt.Client:
        return mqtt.make_client(
            settings.mqtt,
            identifier=f"{settings.client_id}-side",
            protocol=protocol,
            persistent=False,
            keepalive_seconds=settings.mqtt_keepalive_seconds,
        )

    def handle(topic: str, payload: bytes) -> None:
        if topic in TOPICS:
            stats.observe(topic, payload)
        else:
            announcer.observe(topic, payload)

    await mqtt.watch_topics(
        make,
        settings.mqtt_protocol,
        TOPICS + STREAM_TOPICS,
        handle,
        connection=announcer.connection,
    )
