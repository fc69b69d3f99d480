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

No row lock is held across network I/O, so ingest's batch (which applies acks first)
never waits for the broker. A delivery is three steps:

1. claim, in a short transaction: lock the device's row (``FOR NO KEY UPDATE``: claims
   and POSTs of one device take turns; ingest's ``FOR KEY SHARE`` is not held up), then
   lease its due messages (``claimed_until``, ``LEASE_SECONDS`` ahead) and commit. A
   device with a live lease is skipped: another claim is publishing its messages, and
   its holder sends what came meanwhile (each dispatcher handles notifications one after
   another, and every replica hears every notification), so messages keep their order.
   Message rows locked by another transaction (an ack being applied) are skipped;
2. publish, outside any transaction and without a database connection;
3. mark sent, ending the lease: ``sent`` only from ``queued`` or ``sent``, so a message
   the device acknowledged (or a person cancelled) in the meantime keeps its final
   state; the delivery is recorded either way (``deliveries``, the ``sent`` event at the
   claim's time, before the ack's). Rows locked by an ack being applied are marked one
   at a time, after it: the mark never waits while holding rows ingest may want.

At least once: a message may reach the device more than once (a re-send after a lost
ack, after reconnecting, a publish whose PUBACK or mark was lost, a lease that ran out),
so devices drop a message whose id they have already handled, and acknowledge it again.
Two replicas never send one message at the same moment (the lease), and after a device
comes online only messages last sent before that moment (the database's clock, carried
by the notification; a delivery's time is its claim's, before the publish) are sent
again: each replica gets the notification, one re-sends.

Notifications taken while sending is impossible (no broker connection, or paused after
a publish timed out) are kept, up to ``MAX_PENDING_DEVICES`` devices, and handled once
sending resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg
import orjson
from prometheus_client import Counter

from fleetline import db, mqtt
from fleetline.protocol import C2D, topic_for
from fleetline_api.queries import c2d as sql
from fleetline_api.settings import ApiSettings
from fleetline_api.workers.broker import BrokerLink

log = logging.getLogger(__name__)

CHANNEL = "fleetline_c2d"
PUBLISH_TIMEOUT_SECONDS = 5.0
# A claim's lease: its publishes (at most PUBLISH_TIMEOUT_SECONDS) and the mark must fit
# in it; past it, another claim may send the message again.
LEASE_SECONDS = 2 * PUBLISH_TIMEOUT_SECONDS
# Messages claimed and published in one round; a full round is followed by another.
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
# While notifications wait for sending to resume, check this often whether it has.
RESUME_CHECK_SECONDS = 0.5

EVENTS = Counter(
    "fleetline_api_c2d_messages_total",
    "Cloud-to-device messages by what happened to them in the API (queued, sent, expired, "
    "cancelled); completed and rejected are counted by ingest",
    ["event"],
)
for _event in ("queued", "sent", "expired", "cancelled"):
    EVENTS.labels(_event)

T = TypeVar("T")


def queued_notification(device_id: str) -> str:
    """What the POST sends on CHANNEL in its transaction."""
    return orjson.dumps({"queued": device_id}).decode()


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

    @property
    def pending_devices(self) -> int:
        """Devices whose notifications wait to be handled."""
        return len(self._online) + len(self._queued)

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
        self._bound()
        self._wake.set()

    def _bound(self) -> None:
        if self.pending_devices > MAX_PENDING_DEVICES:
            log.warning(
                "more than %d devices wait for cloud-to-device delivery; the sweep takes over",
                MAX_PENDING_DEVICES,
            )
            self._online.clear()
            self._queued.clear()
            self._sweep_now = True

    def _keep(self, devices: list[tuple[str, str | None]]) -> None:
        """Devices that could not be served yet go back (a newer notification of one,
        taken meanwhile, stays)."""
        for device_id, at in devices:
            if at is None:
                self._queued.add(device_id)
            else:
                self._online.setdefault(device_id, at)
        self._bound()

    # -- the worker ---------------------------------------------------------------------

    async def _guard(self, work: Awaitable[T], what: str) -> T | None:
        try:
            return await work
        except Exception as exc:  # the dispatcher never stops; the next round retries
            log.warning("cloud-to-device %s failed: %r", what, exc)
            return None

    def _sender(self) -> mqtt.Client | None:
        """The broker connection to send on; None while there is none or sending pauses."""
        if asyncio.get_running_loop().time() < self._paused_until:
            return None
        return self._broker.client

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._settings.c2d_sweep_s
        next_sweep = loop.time()
        while True:
            timeout = next_sweep - loop.time()
            if self.pending_devices and self._sender() is None:
                timeout = min(timeout, RESUME_CHECK_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, timeout))
            self._wake.clear()
            if self._sender() is not None:
                online, self._online = self._online, {}
                queued, self._queued = self._queued, set()
                todo = [*online.items(), *((d, None) for d in queued - online.keys())]
                for i, (device_id, at) in enumerate(todo):
                    done = await self._guard(self.deliver_device(device_id, at), "delivery")
                    if done is False:  # sending stopped: the rest waits for it to resume
                        self._keep(todo[i:])
                        break
            if self._sweep_now or loop.time() >= next_sweep:
                self._sweep_now = False
                started = loop.time()
                more = await self._guard(self.sweep(), "sweep")
                # A full round leaves more to do: go on at once (notifications first).
                next_sweep = loop.time() if more else started + interval

    async def deliver_device(self, device_id: str, online_at: str | None) -> bool:
        """Send the device's queued messages and, with ``online_at``, those last sent
        before it came online; round after round while rounds are full. False when
        sending is not possible (no broker connection, paused) or a publish failed."""
        reason = "the device came online again"
        while True:
            client = self._sender()
            if client is None:
                return False
            rows = await self._claim(sql.CLAIM_FOR_DEVICE, device_id, online_at, CLAIM_LIMIT)
            if not rows:
                return True
            if not await self._send(client, rows, reason, device_id=device_id):
                return False
            if len(rows) < CLAIM_LIMIT:
                return True

    async def sweep(self) -> bool:
        """Expire, send what is due, purge; True when a round was full (more to do)."""
        settings = self._settings
        async with self._pool.acquire() as con:
            expired = len(await con.fetch(sql.EXPIRE_TTL, EXPIRE_LIMIT))
            expired += len(
                await con.fetch(
                    sql.EXPIRE_EXHAUSTED,
                    settings.c2d_max_deliveries,
                    settings.c2d_ack_timeout_s,
                    EXPIRE_LIMIT,
                )
            )
            now = asyncio.get_running_loop().time()
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL_SECONDS
                status = await con.execute(sql.PURGE, settings.c2d_retention_s, PURGE_LIMIT)
                purged = int(status.rsplit(" ", 1)[-1])
                if purged:
                    log.info("removed %d finished cloud-to-device messages", purged)
                    if purged == PURGE_LIMIT:
                        self._next_purge = now
        if expired:
            EVENTS.labels("expired").inc(expired)
            log.info("cloud-to-device messages expired", extra={"messages": expired})
        more = await self._send_due()
        return more or expired >= EXPIRE_LIMIT

    async def _send_due(self) -> bool:
        """Claim due messages device by device, up to CLAIM_LIMIT, and send them; True
        when the round was full and every publish succeeded."""
        client = self._sender()
        if client is None:
            return False  # the next sweep after sending resumes
        settings = self._settings
        timeout = settings.c2d_ack_timeout_s
        devices = await self._pool.fetch(
            sql.DUE_DEVICES, settings.c2d_max_deliveries, timeout, CLAIM_LIMIT
        )
        rows: list[asyncpg.Record] = []
        for device in devices:
            rows += await self._claim(
                sql.CLAIM_OVERDUE, device["device_id"], timeout, CLAIM_LIMIT - len(rows)
            )
            if len(rows) >= CLAIM_LIMIT:
                break
        if not rows:
            return False
        ok = await self._send(client, rows, f"no acknowledgement within {timeout:g} s")
        return ok and (len(rows) >= CLAIM_LIMIT or len(devices) >= CLAIM_LIMIT)

    async def _claim(
        self, claim: str, device_id: str, resend: Any, limit: int
    ) -> list[asyncpg.Record]:
        """Lease the device's due messages (see queries/c2d.py), in the order they were
        queued."""
        async with self._pool.acquire() as con, con.transaction():
            if await con.fetchval(sql.LOCK_DEVICE, device_id) is None:
                return []  # deleted
            rows = await con.fetch(
                claim, device_id, self._settings.c2d_max_deliveries, resend, limit, LEASE_SECONDS
            )
        return sorted(rows, key=lambda r: r["seq"])

    async def _send(
        self,
        client: mqtt.Client,
        rows: list[asyncpg.Record],
        reason: str,
        *,
        device_id: str | None = None,
    ) -> bool:
        """Publish claimed messages (no transaction, no connection held), then mark
        those the broker took as sent; True when every publish succeeded. A failed one
        stays leased until its lease runs out, and sending pauses."""
        # Publishes start in this order (each calls paho before its first await).
        published = await asyncio.gather(*(self._publish(client, r) for r in rows))
        sent = [r for r, ok in zip(rows, published, strict=True) if ok]
        if sent:
            await self._mark_sent(sent, reason)
        failed = len(rows) - len(sent)
        EVENTS.labels("sent").inc(len(sent))
        fields: dict[str, Any] = {"messages": len(sent), "failed": failed}
        if device_id is not None:
            fields["device_id"] = device_id
        log.info("cloud-to-device messages sent", extra=fields)
        if failed:
            self._paused_until = asyncio.get_running_loop().time() + SEND_PAUSE_SECONDS
            log.warning(
                "%d cloud-to-device publishes failed; sending pauses for %.0f s",
                failed,
                SEND_PAUSE_SECONDS,
            )
        return failed == 0

    async def _mark_sent(self, rows: list[asyncpg.Record], reason: str) -> None:
        def args(rs: list[asyncpg.Record]) -> tuple[Any, ...]:
            return (
                [r["id"] for r in rs],
                [r["claimed_at"] for r in rs],
                [r["claimed_until"] for r in rs],
                reason,
            )

        marked = {r["id"] for r in await self._pool.fetch(sql.MARK_SENT, *args(rows))}
        for row in rows:
            if row["id"] not in marked:  # locked by an ack (or a cancel) being applied
                await self._pool.execute(sql.MARK_ONE_SENT, *args([row]))

    @staticmethod
    async def _publish(client: mqtt.Client, row: asyncpg.Record) -> bool:
        message_id: uuid.UUID = row["id"]
        try:
            await client.publish(
                topic_for(row["device_id"], C2D),
                _payload(row),
                qos=1,
                # MQTT 5: the broker drops it when its time to live runs out. (3.1.1 has
                # no expiry: a device may get it late, and its ack is then ignored.)
                properties=mqtt.publish_properties(client, expiry_seconds=row["ttl_left"]),
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except (mqtt.MqttError, OSError) as exc:
            log.debug(
                "c2d publish failed: %s",
                exc,
                extra={"device_id": row["device_id"], "message_id": str(message_id)},
            )
            return False
        return True
