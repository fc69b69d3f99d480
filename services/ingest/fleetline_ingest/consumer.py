"""The ingest pipeline: MQTT in, batches out, acknowledgements after commit.

    broker ──DirectReader──> on_message (parse into the current batch)
                                 │ sealed when full or old
                                 ▼
                           queue (2 batches) ──> writer: COPY, commit, then PUBACK

The connection, the bounds on what is held and the acknowledgements are the common
consumer's (:class:`fleetline.consumer.AckConsumer`, shared with rules): memory is
bounded by ``max_pending_messages`` / ``_rows`` / ``_bytes``, above which reading from
the socket pauses and the broker holds the rest of the backlog. A batch is acknowledged
only on the connection its messages came in on; after a reconnect the broker redelivers
whatever was not acknowledged and the idempotent insert drops the copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from fleetline import db, mqtt
from fleetline.consumer import AckConsumer, Bounds, Gauges
from fleetline.protocol import C2D_ACK, MODULES, STATUS, TELEMETRY, TOPIC_ROOT, TWIN_REPORTED
from fleetline.settings import StorageSettings
from fleetline_ingest import broker_stats, metrics
from fleetline_ingest.announcer import StreamAnnouncer
from fleetline_ingest.batch import Batch, collect, rebuild
from fleetline_ingest.settings import IngestSettings
from fleetline_ingest.writer import BatchSupersededError, BatchWriter

log = logging.getLogger(__name__)

QUEUED_BATCHES = 2
MAINTAIN = """
SELECT CASE WHEN pg_try_advisory_xact_lock(hashtext('fleetline.maintain'))
            THEN fleetline_maintain($1::text::interval, $2)
                 + fleetline_expire_rollups($3::text::interval, $4::text::interval) END
"""
# At shutdown, how long the last committed batches may take to be announced.
STREAM_FLUSH_SECONDS = 2.0
# What ingest subscribed to before it took every topic under devices/, and the share
# group it used by default then: unsubscribed from a session carried over from that
# release.
PREVIOUS_TOPICS = (
    f"{TOPIC_ROOT}/+/{TELEMETRY}",
    f"{TOPIC_ROOT}/+/{STATUS}",
    f"{TOPIC_ROOT}/+/{TWIN_REPORTED}",
    f"{TOPIC_ROOT}/+/{MODULES}/+/{TWIN_REPORTED}",
    f"{TOPIC_ROOT}/+/{C2D_ACK}",
)
PREVIOUS_SHARE_GROUP = "ingest"


class Ingestor:
    def __init__(
        self,
        settings: IngestSettings,
        storage: StorageSettings,
        pool: asyncpg.Pool[Any],
        *,
        retention: timedelta | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.pool = pool
        self.limits = dataclasses.replace(settings.limits, max_age=retention)
        self.announcer = StreamAnnouncer(settings.client_id, enabled=settings.stream_events)
        self.writer = BatchWriter(
            seen_resolution_seconds=settings.seen_resolution_seconds,
            limits=self.limits,
            announcer=self.announcer,
        )
        self.current = Batch(generation=0)
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=QUEUED_BATCHES)
        # Done when the last batch with reported twin patches has been written.
        self._twin_turn: asyncio.Future[None] | None = None
        self.consumer = AckConsumer(
            settings,
            service="ingest",
            topics=mqtt.device_message_topics(every_kind=True),
            handler=self.on_message,
            bounds=Bounds(
                settings.max_pending_messages, settings.max_pending_rows, settings.max_pending_bytes
            ),
            gauges=Gauges(metrics.PENDING_MESSAGES, metrics.PAUSED, metrics.CONNECTED),
            # Whatever came in on the previous connection is written (not acknowledged:
            # its message ids mean nothing on the next connection).
            before_connect=self._seal,
            previous_topics=PREVIOUS_TOPICS,
            previous_share_groups=[PREVIOUS_SHARE_GROUP],
        )
        self._batch_full = asyncio.Event()
        self._batch_started = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    # -- receiving (runs inside paho's read callback, on the event loop) ---------------

    def on_message(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> None:
        batch = self.current
        if not batch.acks:
            batch.generation = self.consumer.generation
            batch.started = self._loop.time()
            self._batch_started.set()
        rows_before = len(batch.rows)
        now = datetime.now(UTC)
        batch.acks.append((mid, qos))
        # A retained message arrives only as a replay on (re)subscribing: ingest stored it
        # when it was published (a persistent session receives it then, retain flag
        # cleared), so the replay is acknowledged and not taken as fresh news.
        batch.raw.append((topic, payload, now, not retain))
        if not retain:
            collect(batch, topic, payload, now, self.limits)
        batch.payload_bytes += len(payload)
        if len(batch.rows) >= self.settings.batch_rows or (
            len(batch.acks) >= self.settings.batch_messages
        ):
            self._batch_full.set()
        self.consumer.hold(1, len(batch.rows) - rows_before, len(payload))

    async def _seal(self) -> None:
        """Hand the current batch to the writer (waits while the writer is behind)."""
        batch = self.current
        if not batch.acks:
            return
        self.current = Batch(generation=0)
        self._batch_full.clear()
        self._batch_started.clear()
        await self.queue.put(batch)

    # -- the loops --------------------------------------------------------------------

    async def flush_loop(self) -> None:
        max_age = self.settings.batch_ms / 1000
        while True:
            batch = self.current
            if not batch.acks:
                await self._batch_started.wait()
                continue
            remaining = batch.started + max_age - self._loop.time()
            if remaining > 0 and not self._batch_full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), remaining)
            if batch is self.current:
                await self._seal()

    async def write_loop(self) -> None:
        """One of ``settings.writers`` writers, each with its own connection: a batch is
        parsed and encoded while another's COPY runs in the database. Batches commit in
        any order, except that batches with reported twin patches commit in the order
        they were received (a device's patches are applied in order); everything else a
        batch writes is ordered by its content (ts, status times) or idempotent."""
        while True:
            batch = await self.queue.get()
            received = (batch.messages, len(batch.rows), batch.payload_bytes)
            turn: asyncio.Future[None] | None = None
            try:
                if not self._is_current(batch):
                    batch = self._without_redeliveries(batch)
                if batch.twin:
                    # Taken before any await: the order of the queue.
                    previous, turn = self._twin_turn, self._loop.create_future()
                    self._twin_turn = turn
                    if previous is not None:
                        await previous
                await self._write_with_retry(batch)
                self._acknowledge(batch, received[0])
            finally:
                if turn is not None and not turn.done():
                    turn.set_result(None)
                self.consumer.release(*received)
                self.queue.task_done()

    def _is_current(self, batch: Batch) -> bool:
        """Its messages can still be acknowledged: their connection is the live one."""
        return not batch.stale and self.consumer.is_live(batch.generation)

    def _without_redeliveries(self, batch: Batch) -> Batch:
        """A batch whose connection closed before it was written. The broker redelivers
        its QoS 1 messages when it resumes our session, so only the messages that are
        safe to write twice are written now (QoS 0 ones, readings that carry ``ts``):
        writing the others too would store a reading without ts twice, under two receive
        times. Writing the idempotent ones matters when the broker crashed: it restores
        its session from its last save and cannot redeliver what came in after it.
        Ingest always asks for its session to be kept; only when the broker is
        known to have lost it (a connection made since says so) is everything written.
        Not waiting for that answer keeps the writer from waiting on the reconnect loop,
        which may itself be waiting for room in the queue."""
        if self.consumer.session_lost:
            batch.stale = True
            return batch
        return rebuild(batch, self.limits, without_redelivered=True)

    async def _write_with_retry(self, batch: Batch) -> None:
        attempt = 0
        while True:
            still_current = None if batch.stale else functools.partial(self._is_current, batch)
            try:
                async with self.pool.acquire() as con:
                    await self.writer.write_batch(con, batch, still_current)
                return
            except BatchSupersededError:
                # Rolled back: the broker redelivers it. Write only what it will not.
                batch = self._without_redeliveries(batch)
                continue
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
                metrics.WRITE_ERRORS.labels("transient").inc()
                delay = db.retry_delay(attempt)
                log.warning(
                    "batch write failed (%s); retrying in %.1f s",
                    exc,
                    delay,
                    extra={"batch_rows": len(batch.rows), "attempt": attempt},
                )
                attempt += 1
                await asyncio.sleep(delay)

    def _acknowledge(self, batch: Batch, received: int) -> None:
        if batch.stale or not self.consumer.acknowledge(batch.generation, batch.acks):
            # Its connection is gone: the broker redelivers its QoS 1 messages and the
            # idempotent insert drops the copies of those written now.
            log.info(
                "batch written after its connection closed; the broker redelivers the rest",
                extra={"messages": received, "written": len(batch.raw)},
            )

    async def maintenance_loop(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as con:
                    # One replica at a time; the others skip this round.
                    dropped = await con.fetchval(
                        MAINTAIN,
                        self.storage.raw_retention,
                        self.storage.partitions_ahead,
                        self.storage.rollup_1m_retention,
                        self.storage.rollup_1h_retention,
                    )
                if dropped:
                    log.info("storage upkeep removed %d expired partitions and rollups", dropped)
            except Exception as exc:  # upkeep must not take the service down
                log.warning("storage maintenance failed: %s", exc)
            await asyncio.sleep(self.settings.maintenance_interval_seconds)

    async def ready(self) -> bool:
        return self.consumer.subscribed and await db.answers(self.pool)

    # -- running and stopping ---------------------------------------------------------

    async def run(self) -> None:
        flush = asyncio.create_task(self.flush_loop(), name="ingest.flush")
        writers = [
            asyncio.create_task(self.write_loop(), name=f"ingest.write.{i}")
            for i in range(self.settings.writers)
        ]
        upkeep = [
            asyncio.create_task(self.maintenance_loop(), name="ingest.maintenance"),
        ]
        # Kept through shutdown until the last batches are announced.
        stream = [
            asyncio.create_task(self.announcer.run(), name="ingest.announcer"),
            asyncio.create_task(
                broker_stats.watch(self.settings, self.announcer), name="ingest.side_link"
            ),
        ]
        tasks = [asyncio.create_task(self.consumer.run(), name="ingest.mqtt"), flush]
        tasks += writers + upkeep + stream
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RuntimeError("an ingest loop stopped unexpectedly")
        finally:
            await self._drain(tasks, flush, writers, upkeep)

    async def _drain(
        self,
        tasks: list[asyncio.Task[None]],
        flush_task: asyncio.Task[None],
        writers: list[asyncio.Task[None]],
        upkeep: list[asyncio.Task[None]],
    ) -> None:
        """Stop reading, write and acknowledge what was received, then disconnect."""
        # No more reads, and a connection lost from here on is not made again.
        self.consumer.stop_reading()
        flush_task.cancel()
        for task in upkeep:
            task.cancel()
        log.info(
            "stopping: writing what was received",
            extra={"messages": self.current.messages, "queued_batches": self.queue.qsize()},
        )
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_seconds):
                if any(not w.done() for w in writers):
                    await self._seal()
                    await self.queue.join()
        except TimeoutError:
            log.warning("shutdown timed out; unacknowledged messages stay with the broker")
        await self.announcer.flush(STREAM_FLUSH_SECONDS)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
