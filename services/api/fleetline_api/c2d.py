"""Delivery of cloud-to-device (C2D) messages: the dispatcher each API process runs.

The queue is the ``c2d_messages`` table (migrations/0015). A message is ``queued`` when
POSTed, ``sent`` once published to ``devices/{id}/c2d`` (QoS 1, the broker's PUBACK
received), and ``completed`` or ``rejected`` when the device acknowledges it on
``devices/{id}/c2d/ack`` (ingest applies the ack, in its batch transaction). A message
not acknowledged within its time to live is ``expired``; ``cancelled`` is a person's
decision over REST.

When the dispatcher sends:

* at once, when a message is queued for a device that is online (the POST notifies the
  ``fleetline_c2d`` channel in its transaction);
* when a device comes online (its ``online`` status, which ingest stores; a trigger on
  ``device_activity`` notifies the channel): its queued messages, and those it was sent
  but did not acknowledge, since a device with a clean session lost them;
* on a sweep every ``FLEETLINE_API_C2D_SWEEP_S``: queued messages of online devices
  (notifications may be missed while the LISTEN connection is down), and sent ones not
  acknowledged within ``FLEETLINE_API_C2D_ACK_TIMEOUT_S`` while the device stays online.

A message is sent at most ``FLEETLINE_API_C2D_MAX_DELIVERIES`` times; if the last
delivery is not acknowledged within the ack timeout, it expires. Messages go out in the
order they were queued, per device (a re-sent one may come after newer ones).

At least once: a message may reach the device more than once (a re-send after a lost
ack, after reconnecting, a publish whose PUBACK or commit was lost), so devices drop a
message whose id they have already handled, and acknowledge it again. API replicas
claim messages with ``FOR UPDATE SKIP LOCKED``, so two replicas never send one message
at the same moment, and after a device comes online only messages last sent before that
moment (the database's clock, carried by the notification) are sent again: each replica
gets the notification, one re-sends.

Rows are locked from the claim until the publishes are acknowledged by the broker (at
most ``PUBLISH_TIMEOUT_SECONDS``) and marked sent; an ack from the device arriving
meanwhile waits for that commit in ingest, and then completes the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiomqtt
import asyncpg
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import Counter

from fleetline import db, mqtt
from fleetline.protocol import C2D, topic_for
from fleetline_api.broker import BrokerLink
from fleetline_api.settings import ApiSettings

log = logging.getLogger(__name__)

CHANNEL = "fleetline_c2d"
PUBLISH_TIMEOUT_SECONDS = 5.0
# Messages claimed and published in one transaction; a full round is followed by another.
CLAIM_LIMIT = 100
EXPIRE_LIMIT = 1000
PURGE_LIMIT = 1000
PURGE_INTERVAL_SECONDS = 60.0
# Devices with notifications not yet handled; beyond, they are dropped and the sweep
# catches up (queued messages at once, unacknowledged ones after the ack timeout).
MAX_PENDING_DEVICES = 10_000
# After a publish timed out, sending pauses this long: messages that timed out stay in
# the MQTT client's queue until the connection is dropped, so a stuck broker must not
# receive a round every sweep.
SEND_PAUSE_SECONDS = 10.0

EVENTS = Counter(
    "fleetline_api_c2d_messages_total",
    "Cloud-to-device messages by what happened to them in the API (queued, sent, expired, "
    "cancelled); completed and rejected are counted by ingest",
    ["event"],
)
for _event in ("queued", "sent", "expired", "cancelled"):
    EVENTS.labels(_event)

_CLAIMED = """
m.id, m.device_id, m.body::text AS body, m.properties::text AS properties, m.deliveries,
greatest(1, ceil(extract(epoch FROM m.expires_at - now())))::integer AS ttl_left
"""
# One device's messages to send: queued ones, and (with $3, the time it came online) the
# ones last sent before then.
CLAIM_FOR_DEVICE = f"""
SELECT {_CLAIMED}
FROM c2d_messages m JOIN device_activity a ON a.device_id = m.device_id
WHERE m.device_id = $1 AND a.online AND m.state IN ('queued', 'sent')
  AND m.expires_at > now() AND m.deliveries < $2
  AND (m.state = 'queued' OR m.last_sent_at < $3::text::timestamptz)
ORDER BY m.seq
LIMIT $4
FOR UPDATE OF m SKIP LOCKED
"""
# Every online device's queued messages, and sent ones whose ack is overdue.
CLAIM_DUE = f"""
SELECT {_CLAIMED}
FROM c2d_messages m JOIN device_activity a ON a.device_id = m.device_id
WHERE a.online AND m.state IN ('queued', 'sent')
  AND m.expires_at > now() AND m.deliveries < $1
  AND (m.state = 'queued' OR m.last_sent_at <= now() - make_interval(secs => $2))
ORDER BY m.seq
LIMIT $3
FOR UPDATE OF m SKIP LOCKED
"""
# now() is this transaction's start, before the publish: a device that came online after
# it is sent the message again (see CLAIM_FOR_DEVICE), never the other way round.
MARK_SENT = """
WITH sent AS (
    UPDATE c2d_messages
    SET state = 'sent', sent_at = coalesce(sent_at, now()), last_sent_at = now(),
        deliveries = deliveries + 1
    WHERE id = ANY($1::uuid[])
    RETURNING id, deliveries
)
INSERT INTO c2d_message_events (message_id, at, event, detail)
SELECT id, now(), 'sent',
       CASE WHEN deliveries = 1 THEN 'delivery 1'
            ELSE format('delivery %s (%s)', deliveries, $2::text) END
FROM sent
"""
EXPIRE_TTL = """
WITH due AS (
    SELECT id FROM c2d_messages
    WHERE state IN ('queued', 'sent') AND expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE c2d_messages m SET state = 'expired', finished_at = now()
    FROM due WHERE m.id = due.id
    RETURNING m.id, m.deliveries
)
INSERT INTO c2d_message_events (message_id, at, event, detail)
SELECT id, now(), 'expired',
       CASE WHEN deliveries = 0
            THEN 'its time to live ran out before the device was online to receive it'
            ELSE format('its time to live ran out without an acknowledgement '
                        '(%s deliveries)', deliveries) END
FROM moved
RETURNING message_id
"""
EXPIRE_EXHAUSTED = """
WITH due AS (
    SELECT id FROM c2d_messages
    WHERE state = 'sent' AND deliveries >= $1
      AND last_sent_at <= now() - make_interval(secs => $2)
    ORDER BY last_sent_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE c2d_messages m SET state = 'expired', finished_at = now()
    FROM due WHERE m.id = due.id
    RETURNING m.id, m.deliveries
)
INSERT INTO c2d_message_events (message_id, at, event, detail)
SELECT id, now(), 'expired',
       format('no acknowledgement after %s deliveries (the most allowed)', deliveries)
FROM moved
RETURNING message_id
"""
PURGE = """
DELETE FROM c2d_messages
WHERE id IN (
    SELECT id FROM c2d_messages
    WHERE finished_at < now() - make_interval(secs => $1)
    ORDER BY finished_at
    LIMIT $2
)
"""

T = TypeVar("T")


def queued_notification(device_id: str) -> str:
    """What the POST sends on CHANNEL in its transaction."""
    return orjson.dumps({"queued": device_id}).decode()


def _expiring(client: aiomqtt.Client, seconds: int) -> Properties | None:
    """MQTT 5: the broker drops the message when its time to live runs out, so a device
    with a persistent session does not receive it after it expired here. (MQTT 3.1.1
    has no expiry; the device may then receive it late, and its ack is ignored.)"""
    if not mqtt.is_v5(client):
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = max(1, seconds)
    return props


def _payload(row: asyncpg.Record) -> bytes:
    # body and properties are jsonb as text (valid JSON): spliced in, never re-encoded.
    return b'{"id":"%s","body":%s,"properties":%s}' % (
        str(row["id"]).encode(),
        row["body"].encode(),
        row["properties"].encode(),
    )


class C2dDispatcher:
    def __init__(self, settings: ApiSettings, pool: asyncpg.Pool[Any], broker: BrokerLink) -> None:
        self._settings = settings
        self._pool = pool
        self._broker = broker
        self._wake = asyncio.Event()
        # device -> when it came online (text, the database's clock); devices with new
        # queued messages. Swapped out whole by the worker.
        self._online: dict[str, str | None] = {}
        self._queued: set[str] = set()
        self._sweep_now = False
        self._paused_until = 0.0
        self._next_purge = 0.0

    async def run(self) -> None:
        """Listen and dispatch until cancelled; failures are logged and retried."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen(), name="api.c2d.listen")
            tg.create_task(self._work(), name="api.c2d.dispatch")

    # -- notifications ------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                await db.listen(
                    self._settings.dsn, CHANNEL, self._notified, on_listening=self._listening
                )
            except Exception:  # db.listen handles connection loss; anything else is a bug
                log.exception("c2d LISTEN loop failed; restarting")
                await asyncio.sleep(5)

    def _listening(self) -> None:
        # Notifications sent while not listening are gone: a sweep sends what they named.
        log.info("listening for cloud-to-device notifications on %s", CHANNEL)
        self._sweep_now = True
        self._wake.set()

    def _notified(self, _con: Any, _pid: int, _channel: str, payload: Any) -> None:
        try:
            doc = orjson.loads(payload)
            if "online" in doc:
                self._online[str(doc["online"])] = doc.get("at")
            elif "queued" in doc:
                self._queued.add(str(doc["queued"]))
        except Exception as exc:  # not ours, or malformed: nothing to do
            log.warning("ignored a notification on %s: %r", CHANNEL, exc)
            return
        if len(self._online) + len(self._queued) > MAX_PENDING_DEVICES:
            log.warning(
                "more than %d devices wait for cloud-to-device delivery; the sweep takes over",
                MAX_PENDING_DEVICES,
            )
            self._online.clear()
            self._queued.clear()
            self._sweep_now = True
        self._wake.set()

    # -- the worker ---------------------------------------------------------------------

    async def _guard(self, work: Awaitable[T], what: str) -> T | None:
        try:
            return await work
        except Exception as exc:  # the dispatcher never stops; the next round retries
            log.warning("cloud-to-device %s failed: %r", what, exc)
            return None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._settings.c2d_sweep_s
        next_sweep = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_sweep - loop.time()))
            self._wake.clear()
            online, self._online = self._online, {}
            queued, self._queued = self._queued, set()
            for device_id, at in online.items():
                await self._guard(self.deliver_device(device_id, at), "delivery")
            for device_id in queued - online.keys():
                await self._guard(self.deliver_device(device_id, None), "delivery")
            if self._sweep_now or loop.time() >= next_sweep:
                self._sweep_now = False
                started = loop.time()
                more = await self._guard(self.sweep(), "sweep")
                # A full round leaves more to do: go on at once (notifications first).
                next_sweep = loop.time() if more else started + interval

    async def deliver_device(self, device_id: str, online_at: str | None) -> None:
        """Send the device's queued messages and, with ``online_at``, those last sent
        before it came online; round after round while rounds are full."""
        reason = "the device came online again"
        args = (device_id, self._settings.c2d_max_deliveries, online_at, CLAIM_LIMIT)
        while await self._deliver(CLAIM_FOR_DEVICE, args, reason, device_id=device_id):
            pass

    async def sweep(self) -> bool:
        """Expire, send what is due, purge; True when a round was full (more to do)."""
        settings = self._settings
        async with self._pool.acquire() as con:
            expired = len(await con.fetch(EXPIRE_TTL, EXPIRE_LIMIT))
            expired += len(
                await con.fetch(
                    EXPIRE_EXHAUSTED,
                    settings.c2d_max_deliveries,
                    settings.c2d_ack_timeout_s,
                    EXPIRE_LIMIT,
                )
            )
            now = asyncio.get_running_loop().time()
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL_SECONDS
                status = await con.execute(PURGE, settings.c2d_retention_s, PURGE_LIMIT)
                purged = int(status.rsplit(" ", 1)[-1])
                if purged:
                    log.info("removed %d finished cloud-to-device messages", purged)
                    if purged == PURGE_LIMIT:
                        self._next_purge = now
        if expired:
            EVENTS.labels("expired").inc(expired)
            log.info("cloud-to-device messages expired", extra={"messages": expired})
        more = await self._deliver(
            CLAIM_DUE,
            (settings.c2d_max_deliveries, settings.c2d_ack_timeout_s, CLAIM_LIMIT),
            f"no acknowledgement within {settings.c2d_ack_timeout_s:g} s",
        )
        return more or expired >= EXPIRE_LIMIT

    async def _deliver(
        self, claim: str, args: tuple[Any, ...], reason: str, *, device_id: str | None = None
    ) -> bool:
        """Claim messages, publish them, mark those the broker took as sent; True when
        the round was full and every publish succeeded (there may be more)."""
        client = self._broker.client
        loop = asyncio.get_running_loop()
        if client is None or loop.time() < self._paused_until:
            return False  # the sweep tries again once the broker is back
        async with self._pool.acquire() as con, con.transaction():
            rows = await con.fetch(claim, *args)
            if not rows:
                return False
            published = await asyncio.gather(*(self._publish(client, r) for r in rows))
            sent = [r["id"] for r, ok in zip(rows, published, strict=True) if ok]
            if sent:
                await con.execute(MARK_SENT, sent, reason)
        failed = len(rows) - len(sent)
        EVENTS.labels("sent").inc(len(sent))
        fields: dict[str, Any] = {"messages": len(sent), "failed": failed}
        if device_id is not None:
            fields["device_id"] = device_id
        log.info("cloud-to-device messages sent", extra=fields)
        if failed:
            self._paused_until = loop.time() + SEND_PAUSE_SECONDS
            log.warning(
                "%d cloud-to-device publishes failed; sending pauses for %.0f s",
                failed,
                SEND_PAUSE_SECONDS,
            )
        return failed == 0 and len(rows) >= CLAIM_LIMIT

    @staticmethod
    async def _publish(client: aiomqtt.Client, row: asyncpg.Record) -> bool:
        message_id: uuid.UUID = row["id"]
        try:
            await client.publish(
                topic_for(row["device_id"], C2D),
                _payload(row),
                qos=1,
                properties=_expiring(client, row["ttl_left"]),
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except (aiomqtt.MqttError, OSError) as exc:
            log.debug(
                "c2d publish failed: %s",
                exc,
                extra={"device_id": row["device_id"], "message_id": str(message_id)},
            )
            return False
        return True
