"""The rules service: readings and status from the broker, evaluated, transitions stored.

    broker ──DirectReader──> inbox ──> evaluate a batch ──> write its transitions ──> PUBACK
                                           ▲   (one lock: the state changes and their
    ticker (time-based transitions) ───────┤    writes happen in one order)
    flusher (open alarms' value/peak/count)┤
    reload (NOTIFY fleetline_rules, timer) ┘
    router (message routes: which devices, refreshed) ──> route deliveries, written with
                                                           the batch's transitions
    deliverer: action_deliveries ──> webhook / Pushsafer / command
               route_deliveries ──> webhook / MQTT topic

- A message is acknowledged after the transitions it caused are committed: killed at
  any moment, the service loses no raise, and the broker redelivers what it had not
  acknowledged (persistent session). Redelivered readings change nothing: the state
  machine skips readings not newer than the last one it evaluated.
- State that must survive a restart (pending and clearing timers, open alarms) is in
  the database and read back at start; an open alarm is unique per (rule, device) by a
  partial unique index, so a restart or a second replica never raises it twice.
- Message routes (routing.py) queue their deliveries in the same transaction, so a
  reading acknowledged is a reading routed.
- A batch whose write fails is not acknowledged: it is retried (with backoff while the
  database is away or refuses it for reasons of its own), written again without
  notifications when PostgreSQL's NOTIFY queue is full, and written item by item when
  the database refuses its content, so that only an item it refuses alone (a data
  error) is left out, logged with the reason (:meth:`RulesService._persist`).
- The connection, the pending bound and the acknowledgements are the common consumer's
  (:class:`fleetline.consumer.AckConsumer`, shared with ingest).
- Bad payloads are skipped here: ingest dead-letters them.
- One replica by default, on a plain subscription (the broker keeps it across its
  restarts). Replicas may share a subscription ($share/<group>/...), but Mosquitto hands
  each message to one member, so a device's readings may be split between replicas; each
  replica reads the open alarms back at every reload, and the unique index arbitrates
  raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg

from fleetline import db, mqtt
from fleetline.consumer import AckConsumer, Bounds, Gauges
from fleetline.protocol import (
    STATUS,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    TELEMETRY,
    Limits,
    PayloadError,
    Row,
    device_ids,
    parse_telemetry,
    series_name,
    split_device_topic,
    split_module_kind,
)
from fleetline.rules_engine import ROUTES_CHANNEL, RULES_CHANNEL, Phase
from fleetline_rules import metrics, routing, store
from fleetline_rules.actions import Deliverer
from fleetline_rules.evaluator import Change, Evaluator, RuleSet
from fleetline_rules.settings import RulesSettings

log = logging.getLogger(__name__)

# device_activity (ingest's last-seen and status) is read at most this often.
ACTIVITY_POLL_SECONDS = 1.0
# Notifications arriving together (a script creating rules) cause one reload.
RELOAD_DEBOUNCE_SECONDS = 0.05
# Finished route deliveries past their retention are deleted this often.
ROUTE_CLEANUP_INTERVAL_SECONDS = 60.0
# How often files that landed are looked for (routes of files).
FILES_POLL_SECONDS = 1.0
# When PostgreSQL's NOTIFY queue is full (a LISTEN session stopped reading), writes go
# without notifications for this long (as ingest's): the stream misses those alarm
# events, and the delivery workers find the queued work by polling.
NOTIFY_PAUSE_SECONDS = 60.0
# SQLSTATE classes of errors that the content of a write causes: data exception (22),
# integrity constraint violation (23), program limit exceeded (54, e.g. a document too
# large; the full NOTIFY queue is told apart by writing again without notifications).
POISON_CLASSES = ("22", "23", "54")


def is_poison(exc: BaseException) -> bool:
    """An error the written content causes, so writing it again fails again: the
    database refuses a value (classes :data:`POISON_CLASSES`), asyncpg cannot encode
    one, or our code fails on it. Connection, resource, schema and permission errors
    are not: they pass, or need an operator, and the write waits for them."""
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return True  # asyncpg's client-side DataError
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "")).startswith(POISON_CLASSES)
    return isinstance(exc, Exception)


class Message(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    generation: int
    received_at: datetime


class RulesService:
    def __init__(
        self,
        settings: RulesSettings,
        pool: asyncpg.Pool[Any],
        background: asyncpg.Pool[Any] | None = None,
    ) -> None:
        self.settings = settings
        # Batches, ticks, flushes and reloads; the delivery workers, the route refresh
        # and cleanup use ``background`` (their own pool), so they never hold up a write.
        self.pool = pool
        self.background = background or pool
        self.limits = Limits()
        self.evaluator = Evaluator(RuleSet((), {}))
        self.lock = asyncio.Lock()
        self.inbox: deque[Message] = deque()
        self.consumer = AckConsumer(
            settings,
            service="rules",
            topics=mqtt.device_message_topics(),
            # The share group rules used by default before it subscribed plainly.
            previous_share_groups=["rules"],
            handler=self.on_message,
            bounds=Bounds(settings.max_pending_messages),
            gauges=Gauges(metrics.PENDING_MESSAGES, metrics.PAUSED, metrics.CONNECTED),
        )
        self.loaded = False
        self._wake = asyncio.Event()
        self._reload = asyncio.Event()
        self.router = routing.Router()
        self._routes_changed = asyncio.Event()
        # Until when writes leave out their notifications (a full NOTIFY queue).
        self._quiet_until = 0.0
        self.deliverer = Deliverer(
            settings,
            self.background,
            lambda: self.consumer.client,
            extra_queues=[routing.RouteQueue(settings, self.background, metrics.ROUTE_DELIVERIES)],
        )

    # -- loading ------------------------------------------------------------------------

    async def load(self) -> None:
        """Rules, tags and the persisted state of every rule, and message routes (at
        start)."""
        async with self.pool.acquire() as con:
            rules = await store.load_rules(con)
            tags = await store.load_tags(con)
            ruleset = RuleSet(rules, tags)
            states = await store.load_states(con, ruleset.rules)
        async with self.background.acquire() as con:
            await self.router.refresh(con)
        async with self.lock:
            self.evaluator.replace_rules(ruleset, states, set(ruleset.rules))
        metrics.RULES.set(len(rules))
        self.loaded = True
        log.info(
            "rules loaded",
            extra={"rules": len(rules), "states": len(states), "devices_tagged": len(tags)},
        )

    async def reload(self) -> None:
        """Rules and tags again; states of new or changed rules from the database; open
        alarms reconciled (cleared by hand, or raised by another replica)."""
        async with self.pool.acquire() as con:
            rules = await store.load_rules(con)
            tags = await store.load_tags(con)
            old = self.evaluator.rules.rules
            changed = {r.id for r in rules if r.id not in old or old[r.id].version != r.version}
            ruleset = RuleSet(rules, tags)
            fresh = {i: ruleset.rules[i] for i in changed}
            states = await store.load_states(con, fresh) if fresh else {}
            async with self.lock:
                self.evaluator.replace_rules(ruleset, states, changed)
                await self._reconcile(con)
        metrics.RULES.set(len(rules))
        if changed or len(rules) != len(old):
            log.info("rules reloaded", extra={"rules": len(rules), "changed": len(changed)})

    async def _reconcile(self, con: db.Connection) -> None:
        """Under the lock: memory follows the open alarms in the database."""
        rows = await con.fetch(store.LOAD_OPEN_ALARMS, None)
        open_alarms = {(r["rule_id"], r["device_id"]): r for r in rows}
        ev = self.evaluator
        now = datetime.now(UTC)
        for key, state in list(ev.states.items()):
            if state.phase in (Phase.ACTIVE, Phase.CLEARING) and key not in open_alarms:
                ev.reset(key[0], key[1], now)
        for key, row in open_alarms.items():
            rule = ev.rules.rules.get(key[0])
            if rule is None:
                continue
            known = ev.states.get(key)
            if known is None or known.phase in (Phase.IDLE, Phase.PENDING):
                state = ev.watch(key) if rule.kind == "no_data" else ev.state(key)
                state.phase, state.since = Phase.ACTIVE, None
                state.value, state.peak, state.count = row["value"], row["peak"], row["count"]
                ev.timed.discard(key)
                if rule.kind == "no_data":
                    state.offline = True

    # -- receiving (paho's read callback, on the event loop) ----------------------------

    def on_message(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> None:
        self.inbox.append(
            Message(topic, payload, mid, qos, retain, self.consumer.generation, datetime.now(UTC))
        )
        self.consumer.hold()
        self._wake.set()

    def _evaluate(self, msg: Message, routed: list[routing.Delivery]) -> list[Change]:
        parts = split_device_topic(msg.topic)
        if parts is None:
            return []
        device_id, kind = parts
        if not device_ids.valid(device_id):
            return []
        module = split_module_kind(kind)
        if kind == TELEMETRY or (module is not None and module[1] == TELEMETRY):
            metrics.MESSAGES.labels("telemetry").inc()
            rows: list[Row] = []
            try:
                parse_telemetry(device_id, msg.payload, msg.received_at, self.limits, rows)
            except PayloadError:
                return []  # ingest dead-letters it
            if module is not None:
                # A module's readings are the device's series "{module}/{metric}".
                rows = [(d, series_name(module[0], m), ts, v, t) for d, m, ts, v, t in rows]
            if len(rows) > 1:
                rows.sort(key=lambda r: r[2])  # a device's backlog, in time order
            before = self.evaluator.evaluated
            changes = self.evaluator.reading(device_id, rows, msg.received_at)
            metrics.EVALUATIONS.inc(self.evaluator.evaluated - before)
            self.router.match(device_id, rows, routed)
            return changes
        if kind == STATUS and msg.payload in (STATUS_ONLINE, STATUS_OFFLINE):
            metrics.MESSAGES.labels("status").inc()
            return self.evaluator.status(device_id, msg.payload == STATUS_ONLINE, msg.received_at)
        return []

    # -- writing --------------------------------------------------------------------------

    def _notifying(self) -> bool:
        return time.monotonic() >= self._quiet_until

    def _notify_queue_full(self) -> None:
        log.error(
            "the database's NOTIFY queue is full (a LISTEN session stopped reading); "
            "writing without notifications for %.0f s",
            NOTIFY_PAUSE_SECONDS,
        )
        metrics.WRITE_ERRORS.labels("notify_queue_full").inc()
        self._quiet_until = time.monotonic() + NOTIFY_PAUSE_SECONDS

    async def _persist(
        self, changes: list[Change], routed: list[routing.Delivery] | None = None
    ) -> None:
        """Under the lock: write transitions and queue route deliveries. Returns when
        they are committed (the caller then acknowledges their messages), never before:

        - the database away, restarting, or refusing for reasons of its own (schema,
          permissions): retried with backoff; reads pause meanwhile (the inbox fills)
          and nothing is acknowledged;
        - a full NOTIFY queue (raised at COMMIT): written again at once without
          notifications, and so for :data:`NOTIFY_PAUSE_SECONDS`;
        - content the database refuses (:func:`is_poison`): written again item by item
          (each transition, and the deliveries halved until the culprit is alone), each
          in a savepoint of one transaction; what it refuses alone is left out and
          logged with the reason, the rest is committed.
        """
        routed = routed or []
        attempt = 0
        isolate = False
        while True:
            notify = self._notifying()
            try:
                if isolate:
                    queued = await self._write_isolating(changes, routed, notify=notify)
                else:
                    queued = await self._write(changes, routed, notify=notify)
            except Exception as exc:
                if notify and db.is_notify_queue_full(exc):
                    self._notify_queue_full()
                    continue
                if not isolate and is_poison(exc):
                    log.error(
                        "the database refused a batch's %d transitions and %d route "
                        "deliveries (%s); writing them one by one",
                        len(changes),
                        len(routed),
                        exc,
                    )
                    metrics.WRITE_ERRORS.labels("isolated").inc()
                    isolate = True
                    continue
                delay = db.retry_delay(attempt)
                metrics.WRITE_ERRORS.labels("retried").inc()
                if db.is_transient(exc):
                    log.warning("writing transitions failed (%s); retrying in %.1f s", exc, delay)
                else:
                    # Not the content: the batch waits (unacknowledged) for a fix.
                    log.error(
                        "writing %d transitions and %d route deliveries failed; not "
                        "acknowledged, retrying in %.1f s",
                        len(changes),
                        len(routed),
                        delay,
                        exc_info=exc,
                    )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            metrics.ROUTED.inc(queued)
            for change in changes:
                metrics.TRANSITIONS.labels(change.transition.event.value).inc()
                if change.transition.event.value in ("raised", "cleared"):
                    log.info(
                        "alarm %s",
                        change.transition.event.value,
                        extra={
                            "rule_id": change.rule.id,
                            "device_id": change.device_id,
                            "at": change.transition.at.isoformat(),
                            "value": change.transition.value,
                        },
                    )
            return

    async def _write(
        self, changes: list[Change], routed: list[routing.Delivery], *, notify: bool
    ) -> int:
        """One transaction; returns the route deliveries queued."""
        async with self.pool.acquire() as con, con.transaction():
            if not notify:
                await con.execute(db.QUIET_NOTIFY_SQL)
            if changes:
                await store.write(con, changes, self.evaluator, notify=notify)
            return await routing.enqueue(con, routed, notify=notify) if routed else 0

    async def _write_isolating(
        self, changes: list[Change], routed: list[routing.Delivery], *, notify: bool
    ) -> int:
        """One transaction, each item in a savepoint: what the database refuses alone
        (:func:`is_poison`) is left out and logged; any other error aborts the whole."""
        dropped = 0
        queued = 0
        async with self.pool.acquire() as con, con.transaction():
            if not notify:
                await con.execute(db.QUIET_NOTIFY_SQL)
            for change in changes:
                try:
                    async with con.transaction():
                        await store.write(con, [change], self.evaluator, notify=notify)
                except Exception as exc:
                    if not is_poison(exc):
                        raise
                    dropped += 1
                    log.error(
                        "alarm transition left out: the database refuses it: %s",
                        exc,
                        extra={
                            "rule_id": change.rule.id,
                            "device_id": change.device_id,
                            "event": change.transition.event.value,
                            "at": change.transition.at.isoformat(),
                        },
                    )
            parts = [routed] if routed else []
            while parts:
                part = parts.pop()
                try:
                    async with con.transaction():
                        queued += await routing.enqueue(con, part, notify=False)
                except Exception as exc:
                    if not is_poison(exc):
                        raise
                    if len(part) > 1:
                        half = len(part) // 2
                        parts += [part[half:], part[:half]]
                        continue
                    dropped += 1
                    route_id, device_id, ts, _key, values = part[0]
                    log.error(
                        "route delivery left out: the database refuses it: %s",
                        exc,
                        extra={
                            "route_id": route_id,
                            "device_id": device_id,
                            "ts": ts.isoformat(),
                            "metrics": sorted(values)[:20],
                        },
                    )
            if queued and notify:
                await routing.notify_queued(con)
        if dropped:
            metrics.WRITE_ERRORS.labels("dropped").inc(dropped)
            if changes:
                self._reload.set()  # memory may hold a transition the database lacks
        return queued

    # -- the loops ----------------------------------------------------------------------

    async def process_loop(self) -> None:
        batch_size = self.settings.batch_messages
        while True:
            if not self.inbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self.inbox.popleft() for _ in range(min(batch_size, len(self.inbox)))]
            async with self.lock:
                changes: list[Change] = []
                routed: list[routing.Delivery] = []
                for msg in batch:
                    if msg.retain:
                        continue  # a replay of the last status: ingest stored it when new
                    try:
                        changes += self._evaluate(msg, routed)
                    except Exception:  # one odd message must not stop evaluation
                        log.exception("evaluating a message on %s failed", msg.topic[:200])
                if changes or routed:
                    await self._persist(changes, routed)
            self._acknowledge(batch)

    def _acknowledge(self, batch: list[Message]) -> None:
        # Message ids mean nothing on a later connection: the broker redelivers those.
        live = self.consumer.generation
        self.consumer.acknowledge(live, [(m.mid, m.qos) for m in batch if m.generation == live])
        self.consumer.release(len(batch))

    async def tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.tick_interval_seconds
        last_activity = -1e9
        while True:
            started = loop.time()
            try:
                activity = None
                if self.evaluator.rules.no_data and started - last_activity >= max(
                    interval, ACTIVITY_POLL_SECONDS
                ):
                    last_activity = started
                    activity = await store.load_activity(self.pool)
                async with self.lock:
                    changes = self.evaluator.activity(activity) if activity else []
                    changes += self.evaluator.tick(datetime.now(UTC))
                    if changes:
                        await self._persist(changes)
            except Exception as exc:  # the next tick tries again
                log.warning("tick failed: %s", exc)
            elapsed = loop.time() - started
            if elapsed > interval:
                log.warning("a tick took %.2f s, longer than its interval", elapsed)
            await asyncio.sleep(max(0.0, interval - elapsed))

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval_seconds)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("flushing open alarms failed: %s", exc)

    async def flush(self) -> None:
        async with self.lock:
            if not self.evaluator.dirty and not self.evaluator.dirty_rates:
                return
            now = datetime.now(UTC)
            dirty, rates = set(self.evaluator.dirty), set(self.evaluator.dirty_rates)
            while True:
                notify = self._notifying()
                try:
                    async with self.pool.acquire() as con, con.transaction():
                        if not notify:
                            await con.execute(db.QUIET_NOTIFY_SQL)
                        gone = await store.flush(con, self.evaluator, now, notify=notify)
                except BaseException as exc:
                    # Not committed: write these figures again, now or with the next flush.
                    self.evaluator.dirty |= dirty
                    self.evaluator.dirty_rates |= rates
                    if notify and db.is_notify_queue_full(exc):
                        self._notify_queue_full()
                        continue
                    raise
                break
            for rule_id, device_id in gone:
                self.evaluator.reset(rule_id, device_id, now)

    async def reload_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), self.settings.reload_interval_seconds)
            await asyncio.sleep(RELOAD_DEBOUNCE_SECONDS)
            self._reload.clear()
            try:
                await self.reload()
            except Exception as exc:
                log.warning("reloading rules failed: %s", exc)

    async def listen_loop(self) -> None:
        """LISTEN for rule changes and manual clears, and for route changes (the api
        notifies in the transaction of the change); every (re)connection reloads both,
        in case one was missed."""
        await db.listen(
            self.settings.dsn,
            (RULES_CHANNEL, ROUTES_CHANNEL),
            self._on_notify,
            on_listening=self._on_listening,
        )

    def _on_notify(self, _con: object, _pid: int, channel: str, _payload: object) -> None:
        (self._routes_changed if channel == ROUTES_CHANNEL else self._reload).set()

    def _on_listening(self) -> None:
        self._reload.set()
        self._routes_changed.set()

    async def routes_loop(self) -> None:
        """Message routes and the devices they take: again at every route change and
        every ``route_refresh_interval_seconds``; old finished deliveries deleted."""
        loop = asyncio.get_running_loop()
        last_cleanup = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._routes_changed.wait(), self.settings.route_refresh_interval_seconds
                )
            await asyncio.sleep(RELOAD_DEBOUNCE_SECONDS)
            self._routes_changed.clear()
            try:
                async with self.background.acquire() as con:
                    await self.router.refresh(con)
            except Exception as exc:  # the routes in memory stay until the next try
                log.warning("refreshing message routes failed: %s", exc)
            if loop.time() - last_cleanup >= ROUTE_CLEANUP_INTERVAL_SECONDS:
                last_cleanup = loop.time()
                try:
                    deleted = await routing.clean_up(
                        self.background, self.settings.route_log_retention_seconds
                    )
                except Exception as exc:
                    log.warning("deleting old route deliveries failed: %s", exc)
                else:
                    if deleted:
                        log.info("old route deliveries deleted", extra={"rows": deleted})

    async def files_loop(self) -> None:
        """Files that landed, through the routes of files, every FILES_POLL_SECONDS."""
        while True:
            try:
                async with self.background.acquire() as con:
                    while await routing.route_files(con, self.router) == routing.FILES_PER_PASS:
                        pass
            except Exception as exc:  # the mark stays: the same files next time
                log.warning("routing files failed: %s", exc)
            await asyncio.sleep(FILES_POLL_SECONDS)

    async def ready(self) -> bool:
        return self.loaded and self.consumer.subscribed and await db.answers(self.pool)

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.consumer.run(), name="rules.mqtt"),
            asyncio.create_task(self.process_loop(), name="rules.process"),
            asyncio.create_task(self.tick_loop(), name="rules.tick"),
            asyncio.create_task(self.flush_loop(), name="rules.flush"),
            asyncio.create_task(self.reload_loop(), name="rules.reload"),
            asyncio.create_task(self.listen_loop(), name="rules.listen"),
            asyncio.create_task(self.routes_loop(), name="rules.routes"),
            asyncio.create_task(self.files_loop(), name="rules.files"),
            asyncio.create_task(self.deliverer.run(), name="rules.actions"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RuntimeError("a rules loop stopped unexpectedly")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Open alarms' latest figures; what was not evaluated stays with the broker.
            try:
                async with asyncio.timeout(self.settings.shutdown_timeout_seconds):
                    await self.flush()
            except Exception as exc:
                log.warning("final flush failed: %s", exc)
