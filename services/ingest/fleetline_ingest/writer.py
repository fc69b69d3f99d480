"""Writing a batch: one transaction, binary COPY, idempotent insert, then acknowledge.

A reading is stored once even when it comes again (a QoS 1 redelivery after a crash
before the acknowledgement, a device re-sending its backlog). Values are binary-COPYed
straight into ``telemetry`` inside a savepoint; when that hits a unique violation, the
savepoint is rolled back and the batch goes through a per-connection staging table and
``INSERT ... ON CONFLICT DO NOTHING`` (asyncpg's maintainer recommends staging for
this: MagicStack/asyncpg#749). Duplicates are rare, so most batches pay for one COPY
only (batched payloads: 198k -> 248k rows/s, bench/ingest.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from fleetline import db
from fleetline.protocol import MAX_TWIN_BYTES, Limits
from fleetline_ingest import metrics
from fleetline_ingest.batch import Batch, C2dAck, DeadLetter, TwinPatch, collect

if TYPE_CHECKING:
    from fleetline.db import Connection
    from fleetline_ingest.announcer import StreamAnnouncer

log = logging.getLogger(__name__)

STAGING_DDL = """
CREATE TEMPORARY TABLE IF NOT EXISTS telemetry_staging (
    series_id INTEGER, ts TIMESTAMPTZ, value DOUBLE PRECISION, value_text TEXT
) ON COMMIT DELETE ROWS
"""
STAGING_COLUMNS = ("series_id", "ts", "value", "value_text")
MOVE_STAGED = """
INSERT INTO telemetry (series_id, ts, value, value_text)
SELECT series_id, ts, value, value_text FROM telemetry_staging
ON CONFLICT DO NOTHING
"""
RESOLVE_SERIES = """
WITH wanted AS (SELECT * FROM unnest($1::text[], $2::text[]) AS w(device_id, metric)),
ins AS (
    INSERT INTO series (device_id, metric) SELECT device_id, metric FROM wanted
    ON CONFLICT (device_id, metric) DO NOTHING
    RETURNING id, device_id, metric
)
SELECT id, device_id, metric FROM ins
UNION ALL
SELECT s.id, s.device_id, s.metric FROM series s JOIN wanted USING (device_id, metric)
"""
DEAD_LETTER_COLUMNS = ("received_at", "topic", "device_id", "reason", "payload")
UPSERT_ACTIVITY = """
INSERT INTO device_activity AS a (device_id, last_seen, online, status_changed_at)
SELECT d, s, o, c FROM unnest($1::text[], $2::timestamptz[], $3::bool[], $4::timestamptz[])
    AS u(d, s, o, c)
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = greatest(a.last_seen, excluded.last_seen),
    online = CASE WHEN excluded.status_changed_at IS NOT NULL
                   AND (a.status_changed_at IS NULL
                        OR excluded.status_changed_at >= a.status_changed_at)
                  THEN excluded.online ELSE a.online END,
    -- Set only by its gateway going offline (migrations/0031): the device's own status
    -- clears it.
    offline_reason = CASE WHEN excluded.status_changed_at IS NOT NULL
                           AND (a.status_changed_at IS NULL
                                OR excluded.status_changed_at >= a.status_changed_at)
                          THEN NULL ELSE a.offline_reason END,
    status_changed_at = greatest(a.status_changed_at, excluded.status_changed_at)
"""
UPSERT_LATEST = """
INSERT INTO series_latest AS l (series_id, ts, value, value_text)
SELECT * FROM unnest($1::int[], $2::timestamptz[], $3::float8[], $4::text[])
ON CONFLICT (series_id) DO UPDATE
SET ts = excluded.ts, value = excluded.value, value_text = excluded.value_text
WHERE excluded.ts > l.ts
"""
# The children a batch's gateways took offline with them (migrations/0031's trigger), for
# the live stream: $1 devices that went offline, $2 when.
CHILDREN_OFFLINE = """
SELECT a.device_id, a.status_changed_at
FROM unnest($1::text[], $2::timestamptz[]) AS g(id, at)
JOIN devices d ON d.parent_id = g.id
JOIN device_activity a ON a.device_id = d.id
WHERE NOT a.online AND a.offline_reason IS NOT NULL AND a.status_changed_at = g.at
"""
# Reported twin patches, applied one by one in array order (migrations/0018).
APPLY_REPORTED = """
SELECT idx, reason
FROM fleetline_apply_reported(
    $1::text[], $2::text[], $3::jsonb[], $4::timestamptz[], $5::integer
)
"""
# Devices' acknowledgements of cloud-to-device messages, in array order (migrations/0015).
APPLY_C2D_ACKS = """
SELECT idx, reason
FROM fleetline_apply_c2d_acks($1::text[], $2::uuid[], $3::text[], $4::timestamptz[])
"""
# One call per partition the batch's readings fall in (the width is the schema's).
ENSURE_PARTITIONS = """
SELECT fleetline_ensure_partition(min(t))
FROM unnest($1::timestamptz[]) AS t
GROUP BY fleetline_partition_start(
    t, coalesce((SELECT partition_interval FROM storage_config), interval '1 day'))
"""

SERIES_CACHE_MAX = 1_000_000
# When the database's NOTIFY queue is full (a listener stopped reading), batches are
# stored without the notifications of the c2d trigger for this long.
NOTIFY_PAUSE_SECONDS = 60.0


class BatchSupersededError(Exception):
    """The batch's MQTT connection closed while it was being written: it was rolled back,
    because the broker redelivers its messages."""


StillCurrent = Callable[[], bool]


def _is_missing_partition(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition" in str(exc)


async def init_connection(con: asyncpg.Connection[Any]) -> None:
    await con.execute(STAGING_DDL)


class BatchWriter:
    """Writes batches; keeps the (device, metric) -> series id cache."""

    def __init__(
        self,
        *,
        seen_resolution_seconds: float,
        limits: Limits,
        announcer: StreamAnnouncer | None = None,
    ) -> None:
        self._series: dict[tuple[str, str], int] = {}
        self._seen_written: dict[str, datetime] = {}
        self._seen_resolution = seen_resolution_seconds
        self._limits = limits
        # Told of each committed batch, for the API's /v1/stream.
        self._announcer = announcer
        self._notify_paused_until = 0.0

    async def _resolve_series(self, con: Connection, keys: Iterable[tuple[str, str]]) -> None:
        missing = [k for k in keys if k not in self._series]
        if not missing:
            return
        if len(self._series) + len(missing) > SERIES_CACHE_MAX:
            self._series.clear()
        rows = await con.fetch(RESOLVE_SERIES, [k[0] for k in missing], [k[1] for k in missing])
        for r in rows:
            self._series[(r["device_id"], r["metric"])] = r["id"]

    def _activity(
        self, batch: Batch
    ) -> tuple[list[str], list[datetime], list[bool | None], list[datetime | None]]:
        ids: list[str] = []
        seen: list[datetime] = []
        online: list[bool | None] = []
        changed: list[datetime | None] = []
        written = self._seen_written
        for device_id in sorted(batch.seen.keys() | batch.status.keys()):
            status = batch.status.get(device_id)
            last = batch.seen.get(device_id) or (status[1] if status else None)
            assert last is not None
            previous = written.get(device_id)
            if (
                status is None
                and previous is not None
                and (last - previous).total_seconds() < self._seen_resolution
            ):
                continue
            ids.append(device_id)
            seen.append(last)
            online.append(status[0] if status else None)
            changed.append(status[1] if status else None)
        return ids, seen, online, changed

    def _activity_committed(self, ids: list[str], seen: list[datetime]) -> None:
        written = self._seen_written
        if len(written) + len(ids) > SERIES_CACHE_MAX:
            written.clear()
        written.update(zip(ids, seen, strict=True))

    async def write(
        self, con: Connection, batch: Batch, still_current: StillCurrent | None = None
    ) -> int:
        """Commit the batch; returns how many new values were stored.

        ``still_current`` is asked right before the commit; False rolls the batch back
        (:class:`BatchSupersededError`).
        """
        rows = batch.rows
        series = self._series
        try:  # every series id already known: the common case, one pass
            records = [(series[(d, m)], ts, v, t) for d, m, ts, v, t in rows]
        except KeyError:
            await self._resolve_series(con, {(r[0], r[1]) for r in rows})
            records = [(series[(d, m)], ts, v, t) for d, m, ts, v, t in rows]
        activity = self._activity(batch)
        newest: dict[int, tuple[Any, ...]] = {}
        for record in records:
            kept = newest.get(record[0])
            if kept is None or record[1] > kept[1]:
                newest[record[0]] = record
        inserted = 0
        refused: list[DeadLetter] = []
        unknown: list[DeadLetter] = []
        async with con.transaction():
            dead = batch.dead
            if batch.twin:  # rare next to telemetry: a batch without patches skips this
                refused = await self._apply_twin_patches(con, batch.twin)
                if refused:
                    dead = dead + refused
            if batch.c2d_acks:  # rare too: a batch without acks skips this
                unknown = await self._apply_c2d_acks(con, batch.c2d_acks)
                if unknown:
                    dead = dead + unknown
            if records:
                inserted = await self._store_values(con, records)
                # Sorted by series: concurrent replicas lock these rows in one order.
                latest = [newest[sid] for sid in sorted(newest)]
                await con.execute(UPSERT_LATEST, *(list(col) for col in zip(*latest, strict=True)))
            if dead:
                await con.copy_records_to_table(
                    "ingest_dead_letter", records=dead, columns=DEAD_LETTER_COLUMNS
                )
            status = batch.status
            if activity[0]:
                if time.monotonic() < self._notify_paused_until:
                    # The c2d trigger on device_activity notifies too: quiet it as well.
                    await con.execute(db.QUIET_NOTIFY_SQL)
                await con.execute(UPSERT_ACTIVITY, *activity)
                status = await self._with_children(con, status)
            if still_current is not None and not still_current():
                raise BatchSupersededError
        # Only now: a batch that is retried must write its devices' last-seen again.
        self._activity_committed(activity[0], activity[1])
        if self._announcer is not None:
            self._announcer.offer(rows, status)
        if batch.twin:
            metrics.TWIN_PATCHES.inc(len(batch.twin) - len(refused))
            metrics.DEAD_LETTERS.inc(len(refused))
        if batch.c2d_acks:
            metrics.C2D_ACKS.inc(len(batch.c2d_acks) - len(unknown))
            metrics.DEAD_LETTERS.inc(len(unknown))
        return inserted

    async def _with_children(
        self, con: Connection, status: dict[str, tuple[bool, datetime]]
    ) -> dict[str, tuple[bool, datetime]]:
        """The batch's status changes, with those of the children its gateways took
        offline with them, when the live stream has listeners (gateways going offline
        are rare: other batches skip the query)."""
        gone = [(d, at) for d, (online, at) in status.items() if not online]
        if not gone or self._announcer is None or not self._announcer.listening:
            return status
        rows = await con.fetch(CHILDREN_OFFLINE, [d for d, _ in gone], [at for _, at in gone])
        return {**status, **{r["device_id"]: (False, r["status_changed_at"]) for r in rows}}

    async def _apply_twin_patches(
        self, con: Connection, patches: list[TwinPatch]
    ) -> list[DeadLetter]:
        """Merge the reported patches into their twins; the dead letters of those refused
        (device or module not registered, document too large). Sorted by twin (device,
        module), stable: each twin's patches keep their arrival order, and concurrent
        replicas lock twin rows in one order."""
        ordered = sorted(patches, key=lambda p: (p[0], p[1]))
        refused = await con.fetch(
            APPLY_REPORTED,
            [p[0] for p in ordered],
            [p[1] for p in ordered],
            [p[2] for p in ordered],
            [p[3] for p in ordered],
            MAX_TWIN_BYTES,
        )
        dead: list[DeadLetter] = []
        for r in refused:
            device_id, _module, _patch, received_at, topic, payload = ordered[r["idx"] - 1]
            dead.append((received_at, topic, device_id, r["reason"], payload))
        return dead

    async def _apply_c2d_acks(self, con: Connection, acks: list[C2dAck]) -> list[DeadLetter]:
        """Move the acknowledged cloud-to-device messages to completed or rejected; the
        dead letters of acks naming no message of their device. Acks for messages
        already final are ignored (a redelivery). Sorted by device, stable, as twin
        patches are."""
        ordered = sorted(acks, key=lambda a: a[0])
        unknown = await con.fetch(
            APPLY_C2D_ACKS,
            [a[0] for a in ordered],
            [a[1] for a in ordered],
            [a[2] for a in ordered],
            [a[3] for a in ordered],
        )
        dead: list[DeadLetter] = []
        for r in unknown:
            device_id, _id, _outcome, received_at, topic, payload = ordered[r["idx"] - 1]
            dead.append((received_at, topic, device_id, r["reason"], payload))
        return dead

    async def _store_values(self, con: Connection, records: list[tuple[Any, ...]]) -> int:
        try:
            async with con.transaction():  # a savepoint: a duplicate undoes only this
                status = await con.copy_records_to_table(
                    "telemetry", records=records, columns=STAGING_COLUMNS
                )
            return int(status.rsplit(" ", 1)[-1])
        except asyncpg.UniqueViolationError:
            metrics.DUPLICATE_BATCHES.inc()
        await con.copy_records_to_table(
            "telemetry_staging", records=records, columns=STAGING_COLUMNS
        )
        status = await con.execute(MOVE_STAGED)
        return int(status.rsplit(" ", 1)[-1])

    async def write_batch(
        self, con: Connection, batch: Batch, still_current: StillCurrent | None = None
    ) -> None:
        """Write, creating missing partitions on demand; non-transient errors fall back to
        writing message by message so one bad message cannot block the stream."""
        started = time.perf_counter()
        try:
            try:
                inserted = await self._write_creating_partitions(con, batch, still_current)
            except asyncpg.PostgresError as exc:
                if not db.is_notify_queue_full(exc):
                    raise
                # Notifying must never cost stored rows: store without it for a while.
                log.error(
                    "the database's NOTIFY queue is full (a LISTEN session stopped reading); "
                    "storing batches without notifying for %.0f s",
                    NOTIFY_PAUSE_SECONDS,
                )
                metrics.WRITE_ERRORS.labels("notify_queue_full").inc()
                self._notify_paused_until = time.monotonic() + NOTIFY_PAUSE_SECONDS
                inserted = await self._write_creating_partitions(con, batch, still_current)
        except Exception as exc:
            if db.is_transient(exc) or isinstance(exc, BatchSupersededError):
                raise
            metrics.WRITE_ERRORS.labels("rejected").inc()
            log.error(
                "database rejected a batch (%s); writing its %d messages one by one",
                exc,
                batch.messages,
            )
            inserted = await self._write_one_by_one(con, batch)
        elapsed = time.perf_counter() - started
        metrics.BATCHES.inc()
        metrics.BATCH_SECONDS.observe(elapsed)
        metrics.BATCH_ROWS.observe(len(batch.rows))
        metrics.ROWS.inc(inserted)
        metrics.DUPLICATES.inc(max(0, len(batch.rows) - inserted))
        metrics.DEAD_LETTERS.inc(len(batch.dead))
        metrics.MESSAGES.labels("telemetry").inc(batch.telemetry_messages)
        metrics.MESSAGES.labels("status").inc(batch.status_messages)
        if batch.twin_messages:
            metrics.MESSAGES.labels("twin_reported").inc(batch.twin_messages)
        if batch.c2d_ack_messages:
            metrics.MESSAGES.labels("c2d_ack").inc(batch.c2d_ack_messages)
        if batch.other_messages:
            metrics.MESSAGES.labels("not_ingested").inc(batch.other_messages)
        if batch.unknown_messages:
            metrics.MESSAGES.labels("unknown").inc(batch.unknown_messages)
        log.debug(
            "batch committed",
            extra={
                "batch_rows": len(batch.rows),
                "messages": batch.messages,
                "inserted": inserted,
                "dead_letters": len(batch.dead),
                "duration_ms": round(elapsed * 1000, 1),
            },
        )

    async def _write_creating_partitions(
        self, con: Connection, batch: Batch, still_current: StillCurrent | None = None
    ) -> int:
        try:
            return await self.write(con, batch, still_current)
        except asyncpg.CheckViolationError as exc:
            if not _is_missing_partition(exc):
                raise
        log.info("creating partitions for the batch's readings", extra={"rows": len(batch.rows)})
        await con.execute(ENSURE_PARTITIONS, [r[2] for r in batch.rows])
        return await self.write(con, batch, still_current)

    async def _write_one_by_one(self, con: Connection, batch: Batch) -> int:
        inserted = 0
        for topic, payload, received_at, used in batch.raw:
            if not used:
                continue
            single = Batch(generation=batch.generation)
            collect(single, topic, payload, received_at, self._limits)
            try:
                inserted += await self._write_creating_partitions(con, single)
            except Exception as exc:
                if db.is_transient(exc):
                    raise
                reason = f"database rejected the message: {exc}"[:2000]
                single = Batch(generation=batch.generation)
                single.dead.append((received_at, topic, None, reason, payload))
                await self.write(con, single)
        return inserted
