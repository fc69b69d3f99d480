"""Message routes (``/v1/routes``): readings forwarded to a webhook or an MQTT topic.

- **Which devices.** A route's device query (:mod:`fleetline.devicequery`) is evaluated
  in the database, for all routes in one pass over the registry and its twins: one
  statement holds every route's condition and returns, per device, the positions of
  the routes it meets, in pages of devices (routes are split over several passes only
  past PostgreSQL's 32767 parameters). This runs when routes change (NOTIFY
  ``fleetline_routes``) and every ``route_refresh_interval_seconds``: a device whose
  tags, twin or status changed joins or leaves a route within that interval, and a
  newly registered device is routed from the next refresh on. Memory is one entry per
  device some route takes, holding a tuple of route ids that devices with the same
  routes share.
- **Which readings.** A reading of such a device goes to a route without a metric as
  it is; to a route with a metric when it carries that metric and, with a condition
  (``> >= < <= == != outside``, the rules' evaluator), the value meets it. Text values
  never meet a condition. Booleans count as 1 and 0, as they are stored.
- **Durability.** The deliveries of a batch of messages are inserted into
  ``route_deliveries`` in the transaction after which the service acknowledges those
  messages (the same one that writes the alarms they caused), so nothing acknowledged
  is lost. A redelivered or re-sent reading is queued once: a unique index on (route,
  reading key) drops it while its row is kept (``route_log_retention_seconds``).
- **Delivery** is :class:`RouteQueue` on the shared delivery worker (actions.py): at
  least once, retried with backoff, the outcome logged in the row.
- **Files.** A route whose source is ``files`` forwards the files its devices upload
  (their metadata: name, size, SHA-256, content type), not readings. :func:`route_files`
  reads the files completed after the service's mark (``route_file_marks``), in
  (completed_at, id) order and FILES_LAG_SECONDS after they completed, so the
  transactions completing them have committed; it queues their deliveries in the
  transaction that moves the mark, so none is skipped or queued twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from prometheus_client import Counter

from fleetline import db, devicequery, streamevents
from fleetline.protocol import Row
from fleetline.rules_engine import ROUTE_OPS, Condition, RuleDefinitionError
from fleetline_rules import metrics
from fleetline_rules.actions import LEASE_SECONDS, MAX_ERROR_CHARS, Outcome, Queue, Sender
from fleetline_rules.settings import RulesSettings

if TYPE_CHECKING:
    from fleetline.db import Connection

log = logging.getLogger(__name__)

# Wakes the delivery worker when a batch queued deliveries.
DELIVERIES_CHANNEL = "fleetline_route_deliveries"
# Devices read per statement while computing which routes take which device.
MEMBERSHIP_PAGE_ROWS = 5000
# One pass over the registry evaluates every route, unless its statement would exceed
# this many parameters (PostgreSQL takes at most 32767) or this much SQL text; then
# the routes are split over as few passes as fit.
MAX_PARAMS_PER_SCAN = 30_000
MAX_SQL_CHARS_PER_SCAN = 1_000_000
# Deliveries inserted per statement (all in the batch's transaction).
ENQUEUE_CHUNK_ROWS = 5000
# Finished deliveries deleted per statement, and statements per cleanup.
CLEANUP_CHUNK_ROWS = 10_000
CLEANUP_MAX_CHUNKS = 100

LOAD_ROUTES = """
SELECT id, name, source, query, metric, condition, destination ->> 'type' AS kind
FROM message_routes WHERE enabled ORDER BY id
"""
# Files completed after the mark and at least $1 seconds ago, at most $2.
FILES_AFTER_MARK = """
SELECT f.id, f.device_id, f.name, f.content_type, b.size, b.sha256, f.completed_at
FROM route_file_marks m
JOIN device_files f ON f.state = 'complete'
    AND (f.completed_at, f.id) > (m.completed_at, m.file_id)
    AND f.completed_at < now() - make_interval(secs => $1)
JOIN blobs b ON b.id = f.blob_id
ORDER BY f.completed_at, f.id
LIMIT $2
"""
LOCK_FILE_MARK = "SELECT 1 FROM route_file_marks FOR UPDATE"
MOVE_FILE_MARK = "UPDATE route_file_marks SET completed_at = $1, file_id = $2"
FILES_LAG_SECONDS = 3.0
FILES_PER_PASS = 1000
# Per device, the positions (in the statement) of the routes whose query it meets:
# mostly an empty array, so a page costs little to decode however many routes there are.
MEMBERS = """
SELECT d.id, array_remove(ARRAY[{hits}]::int[], NULL) AS hits
FROM {from_} WHERE d.id > $1 ORDER BY d.id LIMIT $2
"""
ENQUEUE = """
INSERT INTO route_deliveries (route_id, device_id, ts, reading_key, metrics)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::bytea[], $5::jsonb[])
ON CONFLICT (route_id, reading_key) DO NOTHING
"""
# Due rows, the oldest first, of each route at most as many as it may still have in
# flight here ($3 per route, less those held: routes $4, counts $5), so one route's
# backlog or hanging receiver cannot take every slot.
CLAIM = """
WITH picked AS (
    SELECT p.id
    FROM message_routes r
    LEFT JOIN unnest($4::bigint[], $5::int[]) AS h (route_id, n) ON h.route_id = r.id
    CROSS JOIN LATERAL (
        SELECT d.id, d.next_attempt_at FROM route_deliveries d
        WHERE d.route_id = r.id AND d.status = 'pending' AND d.next_attempt_at <= now()
          AND (d.locked_until IS NULL OR d.locked_until < now())
        ORDER BY d.next_attempt_at, d.id
        LIMIT greatest($3 - coalesce(h.n, 0), 0)
        FOR UPDATE SKIP LOCKED
    ) p
    ORDER BY p.next_attempt_at, p.id
    LIMIT $1
), claimed AS (
    UPDATE route_deliveries d
    SET locked_until = now() + make_interval(secs => $2), attempts = d.attempts + 1
    FROM picked WHERE d.id = picked.id
    RETURNING d.id, d.route_id, d.device_id, d.ts, d.metrics, d.attempts
)
SELECT c.id, c.route_id, c.device_id, c.ts, c.metrics, c.attempts, r.name, r.destination,
       r.source
FROM claimed c JOIN message_routes r ON r.id = c.route_id
"""
CLEANUP = """
DELETE FROM route_deliveries WHERE id IN (
    SELECT id FROM route_deliveries
    WHERE status <> 'pending' AND created_at < now() - make_interval(secs => $1)
    LIMIT $2
)
"""
# Pending rows of a route deleted while a batch was queuing for it (the api deletes the
# others with the route).
ORPHANS = """
DELETE FROM route_deliveries d
WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM message_routes r WHERE r.id = d.route_id)
"""
PENDING = "SELECT count(*) FROM route_deliveries WHERE status = 'pending'"

# (route id, device id, ts, reading key, values forwarded): one row of ENQUEUE.
Delivery = tuple[int, str, datetime, bytes, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Route:
    id: int
    name: str
    query: str
    kind: str
    metric: str | None = None
    condition: Condition | None = None
    source: str = "readings"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Route:
        doc = row["condition"]
        condition = None
        if doc is not None:
            if doc.get("op") not in ROUTE_OPS:
                raise RuleDefinitionError(f"a route cannot use op {doc.get('op')!r}")
            condition = Condition.from_doc(doc)
        if condition is not None and row["metric"] is None:
            raise RuleDefinitionError("a condition needs a metric")
        return cls(
            id=int(row["id"]),
            name=str(row["name"]),
            query=str(row["query"] or ""),
            kind=str(row["kind"]),
            metric=row["metric"],
            condition=condition,
            source=str(row["source"]),
        )

    def forward(self, values: Mapping[str, Any]) -> dict[str, Any] | None:
        """The values this route forwards from a reading, or None when it takes none."""
        if self.metric is None:
            return dict(values)
        if self.metric not in values:
            return None
        value = values[self.metric]
        if self.condition is not None and (
            not isinstance(value, float) or not self.condition.holds(value, None)
        ):
            return None
        return {self.metric: value}


def reading_key(device_id: str, ts: datetime, metrics_: Sequence[str]) -> bytes:
    """What identifies a forwarded reading (the route is its own column): a reading is
    identified by (device, metric, ts), so by its device, ts and the metrics sent."""
    text = "\n".join([device_id, ts.isoformat(), *sorted(metrics_)])
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Routes and which devices each takes, replaced whole at every refresh."""

    routes: Mapping[int, Route]
    members: Mapping[str, tuple[int, ...]]


class Router:
    def __init__(self) -> None:
        self.snapshot = Snapshot({}, {})

    def match(self, device_id: str, rows: list[Row], out: list[Delivery]) -> None:
        """Append the deliveries of one message's rows (one device) to ``out``."""
        snapshot = self.snapshot
        route_ids = snapshot.members.get(device_id)
        if not route_ids:
            return
        for event in streamevents.telemetry_events(rows):  # one per (device, ts)
            ts, values = event["ts"], event["values"]
            for route_id in route_ids:
                route = snapshot.routes[route_id]
                if route.source != "readings":
                    continue
                forwarded = route.forward(values)
                if forwarded is not None:
                    key = reading_key(device_id, ts, list(forwarded))
                    out.append((route_id, device_id, ts, key, forwarded))

    def match_files(self, files: list[Any]) -> list[Delivery]:
        """The deliveries of files that landed: one per file and route of files that
        takes its device."""
        snapshot = self.snapshot
        out: list[Delivery] = []
        for f in files:
            for route_id in snapshot.members.get(f["device_id"], ()):
                if snapshot.routes[route_id].source != "files":
                    continue
                forwarded = {
                    "file": {
                        "id": f["id"],
                        "name": f["name"],
                        "size": f["size"],
                        "sha256": f["sha256"],
                        "content_type": f["content_type"],
                    }
                }
                key = hashlib.blake2b(f"file\n{f['id']}".encode(), digest_size=16).digest()
                out.append((route_id, f["device_id"], f["completed_at"], key, forwarded))
        return out

    async def refresh(self, con: Connection) -> None:
        """Routes from the database, and the devices each takes."""
        started = time.monotonic()
        routes: dict[int, Route] = {}
        for row in await con.fetch(LOAD_ROUTES):
            try:
                route = Route.from_row(row)
                devicequery.compile_query(route.query)
            except (devicequery.QueryError, RuleDefinitionError, TypeError, ValueError) as exc:
                log.error("skipping message route %s: %s", row["id"], exc)
                continue
            routes[route.id] = route
        members = await self._members(con, list(routes.values()))
        before = self.snapshot
        self.snapshot = Snapshot(routes, members)
        metrics.ROUTES.set(len(routes))
        metrics.ROUTED_DEVICES.set(len(members))
        elapsed = time.monotonic() - started
        if set(routes) != set(before.routes) or elapsed > 1.0:
            log.info(
                "message routes loaded",
                extra={
                    "routes": len(routes),
                    "devices": len(members),
                    "duration_ms": round(elapsed * 1000),
                },
            )

    async def _members(self, con: Connection, routes: list[Route]) -> dict[str, tuple[int, ...]]:
        members: dict[str, tuple[int, ...]] = {}
        shared: dict[tuple[int, ...], tuple[int, ...]] = {}
        for chunk in _chunks(routes):
            try:
                found = await _scan(con, chunk)
            except asyncpg.PostgresError as exc:
                if db.is_transient(exc):
                    raise
                # A query that fails at run time: find it, keep the others.
                found = await _one_by_one(con, chunk)
            for device_id, ids in found.items():
                merged = members.get(device_id, ()) + ids
                members[device_id] = shared.setdefault(merged, merged)
        return members


async def _one_by_one(con: Connection, routes: list[Route]) -> dict[str, tuple[int, ...]]:
    found: dict[str, tuple[int, ...]] = {}
    for route in routes:
        try:
            alone = await _scan(con, [route])
        except asyncpg.PostgresError as exc:
            if db.is_transient(exc):
                raise
            log.error("skipping message route %s: its query failed: %s", route.id, exc)
            continue
        for device_id, ids in alone.items():
            found[device_id] = found.get(device_id, ()) + ids
    return found


def _chunks(routes: list[Route]) -> list[list[Route]]:
    """The routes, in as few groups as fit one statement each (almost always one)."""
    chunks: list[list[Route]] = []
    params = chars = 0
    for route in routes:
        compiled = devicequery.compile_query(route.query)
        count, size = len(compiled.params), len(compiled.where) + 40
        if (
            not chunks
            or params + count > MAX_PARAMS_PER_SCAN
            or chars + size > MAX_SQL_CHARS_PER_SCAN
        ):
            chunks.append([])
            params = chars = 0
        chunks[-1].append(route)
        params += count
        chars += size
    return chunks


async def _scan(con: Connection, routes: list[Route]) -> dict[str, tuple[int, ...]]:
    """Which of ``routes`` take each device: one pass over the registry, a page of
    devices per statement, every route's condition in each."""
    hits: list[str] = []
    params: list[Any] = []
    for position, route in enumerate(routes):
        # Parameters numbered across the routes, after the page's $1 and $2.
        compiled = devicequery.compile_query(route.query, first_param=3 + len(params))
        hits.append(f"CASE WHEN ({compiled.where}) THEN {position} END")
        params += compiled.params
    sql = MEMBERS.format(hits=", ".join(hits), from_=devicequery.DEVICE_FROM)
    ids = [route.id for route in routes]
    found: dict[str, tuple[int, ...]] = {}
    cursor = ""
    while True:
        rows = await con.fetch(sql, cursor, MEMBERSHIP_PAGE_ROWS, *params)
        for row in rows:
            if row["hits"]:
                found[row["id"]] = tuple(ids[i] for i in row["hits"])
        if len(rows) < MEMBERSHIP_PAGE_ROWS:
            return found
        cursor = rows[-1]["id"]


async def enqueue(con: Connection, deliveries: list[Delivery], *, notify: bool = True) -> int:
    """Queue deliveries (in the caller's transaction); returns how many were new.
    ``notify``: wake the delivery workers at commit (off while PostgreSQL's NOTIFY queue
    is full: they poll every second)."""
    queued = 0
    for start in range(0, len(deliveries), ENQUEUE_CHUNK_ROWS):
        chunk = deliveries[start : start + ENQUEUE_CHUNK_ROWS]
        columns: list[list[Any]] = [[], [], [], [], []]
        for delivery in chunk:
            for column, value in zip(columns, delivery, strict=True):
                column.append(value)
        status = await con.execute(ENQUEUE, *columns)
        queued += int(status.rsplit(" ", 1)[-1])
    if queued and notify:
        await notify_queued(con)
    return queued


async def route_files(con: Connection, router: Router) -> int:
    """Queue the deliveries of the files that landed since the mark, and move it (one
    transaction); how many files were read."""
    async with con.transaction():
        await con.execute(LOCK_FILE_MARK)
        files = await con.fetch(FILES_AFTER_MARK, FILES_LAG_SECONDS, FILES_PER_PASS)
        if not files:
            return 0
        await enqueue(con, router.match_files(files))
        await con.execute(MOVE_FILE_MARK, files[-1]["completed_at"], files[-1]["id"])
    return len(files)


async def notify_queued(con: Connection) -> None:
    """Wake the delivery workers when the caller's transaction commits."""
    await con.execute("SELECT pg_notify($1, '')", DELIVERIES_CHANNEL)


async def clean_up(pool: asyncpg.Pool[Any], retention_seconds: float) -> int:
    """Delete finished deliveries older than the retention, a chunk at a time, and
    orphans; refresh the pending gauge."""
    deleted = 0
    for _ in range(CLEANUP_MAX_CHUNKS):
        status = await pool.execute(CLEANUP, retention_seconds, CLEANUP_CHUNK_ROWS)
        count = int(status.rsplit(" ", 1)[-1])
        deleted += count
        if count < CLEANUP_CHUNK_ROWS:
            break
    status = await pool.execute(ORPHANS)
    deleted += int(status.rsplit(" ", 1)[-1])
    metrics.ROUTE_PENDING.set(await pool.fetchval(PENDING))
    return deleted


def message(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    """What a route sends for one delivery: a reading's values, or a file that landed."""
    sent = {
        "delivery_id": f"route-{row['id']}",
        "route_id": row["route_id"],
        "route": row["name"],
        "device_id": row["device_id"],
        "ts": row["ts"],
    }
    forwarded = row["metrics"]
    if row["source"] == "files" and isinstance(forwarded.get("file"), dict):
        return {**sent, "type": "file", "file": forwarded["file"]}
    return {**sent, "values": forwarded}


class RouteQueue(Queue):
    """``route_deliveries``: readings on their way to a route's destination. A delivery
    goes to the route's destination as it is when the delivery is attempted."""

    name = "routes"
    table = "route_deliveries"
    channel = DELIVERIES_CHANNEL
    success_log_level = logging.DEBUG

    def __init__(self, settings: RulesSettings, pool: asyncpg.Pool[Any], counter: Counter) -> None:
        super().__init__(settings, pool, counter)
        self.concurrency = settings.route_concurrency
        self.per_key = settings.route_concurrency_per_route

    async def claim(self, limit: int, held: Mapping[Hashable, int]) -> list[asyncpg.Record]:
        routes = list(held)
        counts = [held[r] for r in routes]
        return list(
            await self.pool.fetch(CLAIM, limit, LEASE_SECONDS, self.per_key, routes, counts)
        )

    def key(self, row: asyncpg.Record) -> Hashable | None:
        return int(row["route_id"])

    def kind(self, row: asyncpg.Record) -> str:
        return str(row["destination"].get("type"))

    def describe(self, row: asyncpg.Record) -> dict[str, Any]:
        return {"route_id": row["route_id"], "device_id": row["device_id"]}

    async def attempt(self, row: asyncpg.Record, sender: Sender) -> Outcome:
        destination: dict[str, Any] = row["destination"]
        payload = message(row)
        delivery_id = str(payload["delivery_id"])
        kind = destination.get("type")
        if kind == "webhook":
            secret = destination.get("secret")
            return await sender.webhook(
                str(destination["url"]),
                payload,
                secret=str(secret) if secret else None,
                headers={
                    "X-Fleetline-Delivery": delivery_id,
                    "X-Fleetline-Event": "route",
                    "X-Fleetline-Route": str(row["route_id"]),
                },
            )
        if kind == "mqtt":
            body = orjson.dumps(payload, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)
            return await sender.publish(
                str(destination["topic"]),
                body,
                user_properties=[("fleetline-delivery", delivery_id)],
            )
        return Outcome(ok=False, error=f"unknown destination type {kind!r}"[:MAX_ERROR_CHARS])
