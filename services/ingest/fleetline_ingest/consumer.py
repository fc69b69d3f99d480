"""The ingest pipeline: MQTT in, batches out, acknowledgements after commit.

    broker ──DirectReader──> on_message (parse into the current batch)
                                 │ sealed when full or old
                                 ▼
                           queue (2 batches) ──> writer: COPY, commit, then PUBACK

Memory is bounded by ``max_pending_messages`` / ``max_pending_rows``: above either,
reading from the socket pauses and the broker holds the rest of the backlog. A batch is
acknowledged only on the connection its messages came in on; after a reconnect the
broker redelivers whatever was not acknowledged and the idempotent insert drops the
copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg

from fleetline import db, mqtt, streamevents
from fleetline.protocol import TOPIC_ROOT
from fleetline.settings import MqttProtocol, StorageSettings
from fleetline_ingest import broker_stats, metrics
from fleetline_ingest.batch import Batch, collect, rebuild
from fleetline_ingest.settings import IngestSettings
from fleetline_ingest.writer import BatchSupersededError, BatchWriter, is_transient

log = logging.getLogger(__name__)

QUEUED_BATCHES = 2
MAINTAIN = """
SELECT CASE WHEN pg_try_advisory_xact_lock(hashtext('fleetline.maintain'))
            THEN fleetline_maintain($1::text::interval, $2)
                 + fleetline_expire_rollups($3::text::interval, $4::text::interval) END
"""
WRITE_RETRY_MAX_SECONDS = 10.0
# What ingest subscribed to before it took every topic under devices/, and the share
# group it used by default then: dropped from a session carried over from that release.
PREVIOUS_TOPICS = (
    f"{TOPIC_ROOT}/+/telemetry",
    f"{TOPIC_ROOT}/+/status",
    f"{TOPIC_ROOT}/+/twin/reported",
    f"{TOPIC_ROOT}/+/modules/+/twin/reported",
    f"{TOPIC_ROOT}/+/c2d/ack",
)
PREVIOUS_SHARE_GROUP = "ingest"


async def _idle() -> None:
    """For a loop with nothing to do here: run() takes a loop that returns for a failure."""
    await asyncio.Event().wait()


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
        self.writer = BatchWriter(
            seen_resolution_seconds=settings.seen_resolution_seconds,
            limits=self.limits,
            notify=settings.stream_notify,
        )
        self.generation = 0
        self.current = Batch(generation=0)
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=QUEUED_BATCHES)
        # Received on the live connection and not yet acknowledged: the backpressure bound.
        self.pending_messages = 0
        self.pending_rows = 0
        self.pending_bytes = 0
        # Every message held in memory, from any connection, until its batch is written.
        self.held_messages = 0
        self.reader: mqtt.DirectReader | None = None
        self.connected = False
        self.stopping = False
        self._batch_full = asyncio.Event()
        self._batch_started = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        metrics.PENDING_MESSAGES.set_function(lambda: self.held_messages)
        metrics.PAUSED.set_function(lambda: int(self.reader is not None and self.reader.paused))

    # -- receiving (runs inside paho's read callback, on the event loop) ---------------

    def on_message(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> None:
        batch = self.current
        if not batch.acks:
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
        self.held_messages += 1
        self.pending_messages += 1
        self.pending_rows += len(batch.rows) - rows_before
        self.pending_bytes += len(payload)
        if len(batch.rows) >= self.settings.batch_rows or (
            len(batch.acks) >= self.settings.batch_messages
        ):
            self._batch_full.set()
        if (
            (
                self.pending_messages >= self.settings.max_pending_messages
                or self.pending_rows >= self.settings.max_pending_rows
                or self.pending_bytes >= self.settings.max_pending_bytes
            )
            and self.reader is not None
            and not self.reader.paused
        ):
            self.reader.pause()
            log.info("pausing reads: %d messages pending", self.pending_messages)

    def _maybe_resume(self) -> None:
        if (
            self.reader is not None
            and self.reader.paused
            and self.pending_messages < self.settings.max_pending_messages // 2
            and self.pending_rows < self.settings.max_pending_rows // 2
            and self.pending_bytes < self.settings.max_pending_bytes // 2
        ):
            self.reader.resume()

    async def _seal(self) -> None:
        """Hand the current batch to the writer (waits while the writer is behind)."""
        batch = self.current
        if not batch.acks:
            return
        self.current = Batch(generation=self.generation)
        self._batch_full.clear()
        self._batch_started.clear()
        await self.queue.put(batch)

    # -- the loops --------------------------------------------------------------------

    def _make_client(self, protocol: MqttProtocol) -> aiomqtt.Client:
        return mqtt.consumer_client(self.settings, protocol)

    def _prepare(self, client: aiomqtt.Client) -> None:
        self.reader = mqtt.DirectReader(client, self.on_message)

    async def mqtt_loop(self) -> None:
        attempt = 0
        while True:
            # Whatever came in on the previous connection is written (not acknowledged:
            # its message ids mean nothing on the next connection).
            await self._seal()
            self.generation += 1
            self.current = Batch(generation=self.generation)
            # What the last connection left unacknowledged will be redelivered: the
            # bound counts only what this connection holds.
            self.pending_messages = 0
            self.pending_rows = 0
            self.pending_bytes = 0
            if self.stopping:
                return
            try:
                async with mqtt.connected(
                    self._make_client, self.settings.mqtt_protocol, prepare=self._prepare
                ) as client:
                    assert self.reader is not None
                    self.reader.start()
                    # Acknowledgements are valid from the CONNACK on: a persistent
                    # session's backlog is already arriving.
                    self.connected = True
                    metrics.CONNECTED.set(1)
                    if self.generation > 1 and not self.reader.session_present:
                        log.error(
                            "the broker did not resume ingest's session: messages it "
                            "queued or had in flight for ingest are lost (is its "
                            "persistence on, and the session expiry long enough?)"
                        )
                    attempt = 0
                    topics = mqtt.device_message_topics(
                        client, self.settings.share_group, every_kind=True
                    )
                    mqtt.subscribe_nowait(client, topics, qos=1)
                    mqtt.unsubscribe_nowait(client, self._superseded_topics(client, topics))
                    if not mqtt.is_v5(client) and self.settings.share_group:
                        log.warning(
                            "MQTT 3.1.1: plain subscription, no shared group; run a single "
                            "ingest replica (each replica would receive every message)"
                        )
                    log.info(
                        "connected to the broker, subscribed",
                        extra={
                            "topics": topics,
                            "client_id": self.settings.client_id,
                            "mqtt": "5" if mqtt.is_v5(client) else "3.1.1",
                        },
                    )
                    await mqtt.wait_disconnected(client)
                    log.warning("broker closed the connection")
            except aiomqtt.MqttError as exc:
                log.warning("MQTT connection lost or refused: %s", exc)
            finally:
                self.connected = False
                metrics.CONNECTED.set(0)
                # Unacknowledged messages will be redelivered; stop counting them.
                self.reader = None
            await asyncio.sleep(mqtt.backoff_seconds(attempt))
            attempt += 1

    def _superseded_topics(self, client: aiomqtt.Client, topics: list[str]) -> list[str]:
        """What an earlier release's ingest subscribed to in this session, and the other
        form (shared or plain) of today's topics: a session that kept them would receive
        messages twice."""
        groups = {"", PREVIOUS_SHARE_GROUP, self.settings.share_group}
        previous = [mqtt.shared(client, g, list(PREVIOUS_TOPICS)) for g in groups]
        other_form = [mqtt.shared(client, g, [f"{TOPIC_ROOT}/#"]) for g in groups]
        return sorted({t for form in previous + other_form for t in form} - set(topics))

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
        while True:
            batch = await self.queue.get()
            received = batch.messages
            try:
                if not self._is_current(batch):
                    batch = self._without_redeliveries(batch)
                await self._write_with_retry(batch)
                self._acknowledge(batch, received)
            finally:
                self.held_messages -= received
                self.queue.task_done()

    def _is_current(self, batch: Batch) -> bool:
        """Its messages can still be acknowledged: their connection is the live one."""
        return not batch.stale and batch.generation == self.generation and self.connected

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
        reader = self.reader
        if self.connected and reader is not None and not reader.session_present:
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
                if not is_transient(exc):
                    raise
                metrics.WRITE_ERRORS.labels("transient").inc()
                delay = min(WRITE_RETRY_MAX_SECONDS, 0.1 * 2**attempt)
                log.warning(
                    "batch write failed (%s); retrying in %.1f s",
                    exc,
                    delay,
                    extra={"batch_rows": len(batch.rows), "attempt": attempt},
                )
                attempt += 1
                await asyncio.sleep(delay)

    def _acknowledge(self, batch: Batch, received: int) -> None:
        reader = self.reader
        if not self._is_current(batch) or reader is None:
            # Its connection is gone: the broker redelivers its QoS 1 messages and the
            # idempotent insert drops the copies of those written now.
            log.info(
                "batch written after its connection closed; the broker redelivers the rest",
                extra={"messages": received, "written": len(batch.raw)},
            )
            return
        for mid, qos in batch.acks:
            reader.ack(mid, qos)
        self.pending_messages -= batch.messages
        self.pending_rows -= len(batch.rows)
        self.pending_bytes -= batch.payload_bytes
        self._maybe_resume()

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

    async def rollup_loop(self) -> None:
        """Recompute the rollups of the minutes that received readings (plain PostgreSQL)."""
        per_round = self.settings.rollup_marks_per_round
        async with self.pool.acquire() as con:
            if await con.fetchval("SELECT timescale FROM storage_config"):
                await _idle()  # continuous aggregates refresh themselves
        while True:
            try:
                while True:
                    async with self.pool.acquire() as con:
                        done = await con.fetchval("SELECT fleetline_roll_up($1)", per_round)
                    metrics.ROLLUP_MINUTES.inc(done)
                    if done < per_round:
                        break
            except Exception as exc:  # replicas racing on one hour, a restart: next round
                log.warning("rollup round failed: %s", exc)
            await asyncio.sleep(self.settings.rollup_interval_seconds)

    async def listeners_loop(self) -> None:
        """Keep ``writer.listeners`` current: whether any API process has stream clients."""
        if not self.writer.notify_enabled:
            await _idle()
        while True:
            try:
                async with self.pool.acquire() as con:
                    listening = bool(await con.fetchval(streamevents.ANY_LISTENER, timeout=5))
                if listening != self.writer.listeners:
                    log.info("stream listeners %s", "present" if listening else "gone")
                self.writer.listeners = listening
            except Exception as exc:  # keep the last answer; ingest itself is unaffected
                log.warning("could not look for stream listeners: %s", exc)
            await asyncio.sleep(streamevents.LISTENER_POLL_SECONDS)

    async def ready(self) -> bool:
        return self.connected and await db.answers(self.pool)

    # -- running and stopping ---------------------------------------------------------

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.mqtt_loop(), name="ingest.mqtt"),
            asyncio.create_task(self.flush_loop(), name="ingest.flush"),
            asyncio.create_task(self.write_loop(), name="ingest.write"),
            asyncio.create_task(self.maintenance_loop(), name="ingest.maintenance"),
            asyncio.create_task(self.rollup_loop(), name="ingest.rollup"),
            asyncio.create_task(self.listeners_loop(), name="ingest.listeners"),
            asyncio.create_task(broker_stats.watch(self.settings), name="ingest.broker_stats"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RuntimeError("an ingest loop stopped unexpectedly")
        finally:
            await self._drain(tasks)

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop reading, write and acknowledge what was received, then disconnect."""
        mqtt_task, flush_task, write_task, *upkeep = tasks
        self.stopping = True  # a connection lost from here on is not made again
        flush_task.cancel()
        for task in upkeep:
            task.cancel()
        if self.reader is not None:
            self.reader.pause()
        log.info(
            "stopping: writing what was received",
            extra={"messages": self.current.messages, "queued_batches": self.queue.qsize()},
        )
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_seconds):
                if not write_task.done():
                    await self._seal()
                    await self.queue.join()
        except TimeoutError:
            log.warning("shutdown timed out; unacknowledged messages stay with the broker")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
