"""Durable delivery queues: alarm actions (webhook, Pushsafer, device command) and
message routes (webhook, MQTT topic).

Each queue is a table written in the transaction that made the work (an alarm that
moved, a reading acknowledged), so a crash loses none: a worker claims due rows
(``FOR UPDATE SKIP LOCKED``, so replicas share them) for a lease; a worker that dies
mid-delivery leaves the row to be claimed again when the lease ends (at least once;
webhooks carry ``X-Fleetline-Delivery`` so a receiver can drop a repeat). Failures are
retried with exponential backoff up to a number of attempts, then marked failed; every
outcome is in the row, which the API serves as the delivery log. Nothing here raises out
of the loop: a broken receiver never stops the service.

:class:`Deliverer` runs one worker per :class:`Queue`; what differs between queues (which
rows, how one is sent) is the queue's, how a message leaves (a signed JSON POST, an MQTT
publish on the service's own connection) is :class:`Sender`'s.

Secrets (webhook secrets, Pushsafer keys) are read from the rows and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
from prometheus_client import Counter

from fleetline import db, mqtt
from fleetline.mqtt import publish_properties
from fleetline_rules import metrics
from fleetline_rules.settings import RulesSettings
from fleetline_rules.store import ACTIONS_CHANNEL

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
POLL_SECONDS = 1.0
MAX_ERROR_CHARS = 500
JSON_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC

ACTION_CLAIM = """
UPDATE action_deliveries d
SET locked_until = now() + make_interval(secs => $2), attempts = d.attempts + 1
WHERE d.id IN (
    SELECT id FROM action_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING d.id, d.alarm_id, d.event, d.action_type, d.action, d.payload, d.target, d.attempts
"""
# A command waiting for its target's rate limit: not an attempt.
POSTPONE = """
UPDATE action_deliveries SET next_attempt_at = $2, locked_until = NULL,
       attempts = attempts - 1, last_error = 'waiting for the command rate limit'
WHERE id = $1
"""
LAST_COMMAND = """
SELECT max(delivered_at) FROM action_deliveries
WHERE action_type = 'command' AND target = $1 AND status = 'delivered'
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    retry: bool = False
    status: int | None = None
    error: str | None = None


class Sender:
    """How a message leaves the service: a JSON POST (signed when there is a secret), or
    a QoS 1 publish on the rules service's own broker connection."""

    def __init__(self, settings: RulesSettings, broker: Callable[[], mqtt.Client | None]) -> None:
        self.settings = settings
        self.broker = broker
        self.http = httpx.AsyncClient(
            timeout=settings.action_timeout_seconds,
            headers={"User-Agent": "fleetline-rules"},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, url: str, **kwargs: Any) -> Outcome | httpx.Response:
        try:
            return await self.http.post(url, **kwargs)
        except httpx.TimeoutException:
            return Outcome(ok=False, retry=True, error="timed out")
        except httpx.HTTPError as exc:
            # The message names the failure (refused, DNS...), not the URL or the body.
            return Outcome(
                ok=False, retry=True, error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            )

    @staticmethod
    def judge(resp: httpx.Response) -> Outcome:
        code = resp.status_code
        if 200 <= code < 300:
            return Outcome(ok=True, status=code)
        # Server errors, rate limits and timeouts may pass; other refusals will not.
        retry = code >= 500 or code in (408, 425, 429)
        return Outcome(ok=False, retry=retry, status=code, error=f"HTTP {code}")

    async def webhook(
        self,
        url: str,
        payload: Mapping[str, Any],
        *,
        secret: str | None,
        headers: Mapping[str, str],
    ) -> Outcome:
        """POST ``payload`` as JSON; with a secret, ``X-Fleetline-Signature:
        sha256=<hex HMAC-SHA256 of the body>``."""
        body = orjson.dumps(payload, option=JSON_OPTIONS)
        sent = {"Content-Type": "application/json", **headers}
        if secret:
            digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            sent["X-Fleetline-Signature"] = f"sha256={digest}"
        resp = await self.post(url, content=body, headers=sent)
        return resp if isinstance(resp, Outcome) else self.judge(resp)

    async def publish(
        self, topic: str, payload: bytes, *, user_properties: Sequence[tuple[str, str]] = ()
    ) -> Outcome:
        """Publish QoS 1 and wait for the broker's PUBACK (bounded by the action
        timeout). On MQTT 5, ``user_properties`` go along (3.1.1 has none)."""
        problem = mqtt.topic_name_problem(topic)
        if problem:
            # The broker would end the whole connection (rules' readings too) over it,
            # at every retry: the delivery fails for good instead.
            return Outcome(ok=False, error=f"topic {topic[:80]!r} {problem}"[:MAX_ERROR_CHARS])
        client = self.broker()
        if client is None:
            return Outcome(ok=False, retry=True, error="not connected to the broker")
        properties = (
            publish_properties(
                client, user_properties=user_properties, content_type="application/json"
            )
            if user_properties
            else None
        )
        try:
            await asyncio.wait_for(
                client.publish(topic, payload, qos=1, properties=properties),
                self.settings.action_timeout_seconds,
            )
        except (mqtt.MqttError, TimeoutError) as exc:
            return Outcome(ok=False, retry=True, error=f"publish failed: {exc}"[:MAX_ERROR_CHARS])
        return Outcome(ok=True)


class Queue:
    """One durable delivery table. Subclasses say which rows to claim and how to send
    one; the worker loop, recording outcomes, backoff, metrics and logging are shared.

    Deliveries run side by side, at most ``concurrency`` at once; those with the same
    :meth:`key` at most ``per_key`` at once (a route, the device commands), so one slow
    destination cannot take every slot."""

    name = ""
    table = ""
    channel = ""
    # What a successful delivery is logged at (routes may send thousands a second).
    success_log_level = logging.INFO
    concurrency = 8
    per_key = 1

    def __init__(self, settings: RulesSettings, pool: asyncpg.Pool[Any], counter: Counter) -> None:
        self.settings = settings
        self.pool = pool
        self.counter = counter
        table = self.table
        self.delivered_sql = f"""
            UPDATE {table} SET status = 'delivered', delivered_at = now(), locked_until = NULL,
                   response_status = $2, last_error = NULL
            WHERE id = $1"""
        self.retry_sql = f"""
            UPDATE {table} SET next_attempt_at = now() + make_interval(secs => $2),
                   locked_until = NULL, response_status = $3, last_error = $4
            WHERE id = $1"""
        self.failed_sql = f"""
            UPDATE {table} SET status = 'failed', locked_until = NULL, response_status = $2,
                   last_error = $3
            WHERE id = $1"""

    async def claim(self, limit: int, held: Mapping[Hashable, int]) -> list[asyncpg.Record]:
        """Up to ``limit`` due rows, leased for :data:`LEASE_SECONDS`. ``held``: how many
        rows of each key this worker holds (a queue may claim a key's rows only up to
        ``per_key``; those beyond wait for their turn here)."""
        raise NotImplementedError

    def key(self, row: asyncpg.Record) -> Hashable | None:
        """Deliveries sharing a key run at most ``per_key`` at once; None: no such bound."""
        return None

    def kind(self, row: asyncpg.Record) -> str:
        raise NotImplementedError

    def describe(self, row: asyncpg.Record) -> dict[str, Any]:
        """Log fields of a delivery (never a secret)."""
        return {}

    async def attempt(self, row: asyncpg.Record, sender: Sender) -> Outcome | None:
        """Try once. None: not attempted (the queue rescheduled the row itself)."""
        raise NotImplementedError

    def backoff(self, attempts: int) -> float:
        return float(
            min(
                self.settings.action_backoff_max_seconds,
                self.settings.action_backoff_seconds * 2 ** (attempts - 1),
            )
        )


class ActionQueue(Queue):
    """``action_deliveries``: what a rule does when its alarm moves."""

    name = "actions"
    table = "action_deliveries"
    channel = ACTIONS_CHANNEL

    def __init__(self, settings: RulesSettings, pool: asyncpg.Pool[Any], counter: Counter) -> None:
        super().__init__(settings, pool, counter)
        self.concurrency = settings.action_concurrency

    async def claim(self, limit: int, held: Mapping[Hashable, int]) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(ACTION_CLAIM, limit, LEASE_SECONDS))

    def key(self, row: asyncpg.Record) -> Hashable | None:
        # Commands go one after another (their rate limit reads the previous delivery);
        # HTTP actions run side by side.
        return "command" if row["action_type"] == "command" else None

    def kind(self, row: asyncpg.Record) -> str:
        return str(row["action_type"])

    def describe(self, row: asyncpg.Record) -> dict[str, Any]:
        return {"alarm_id": row["alarm_id"]}

    async def attempt(self, row: asyncpg.Record, sender: Sender) -> Outcome | None:
        action: dict[str, Any] = row["action"]
        payload: dict[str, Any] = row["payload"]
        kind = row["action_type"]
        if kind == "webhook":
            secret = action.get("secret")
            return await sender.webhook(
                str(action["url"]),
                payload,
                secret=str(secret) if secret else None,
                headers={"X-Fleetline-Delivery": str(row["id"]), "X-Fleetline-Event": row["event"]},
            )
        if kind == "pushsafer":
            return await self._pushsafer(sender, action, payload)
        if kind == "command":
            wait = await self._command_wait(row["target"])
            if wait is not None:
                await self.pool.execute(POSTPONE, row["id"], wait)
                return None
            return await self._command(sender, row["id"], row["target"], action)
        return Outcome(ok=False, error=f"unknown action type {kind!r}")

    async def _command_wait(self, target: str | None) -> datetime | None:
        """When the target may receive its next command, or None when it may now."""
        gap = self.settings.command_min_interval_seconds
        if not target or gap <= 0:
            return None
        last: datetime | None = await self.pool.fetchval(LAST_COMMAND, target)
        if last is None:
            return None
        due = last + timedelta(seconds=gap)
        return due if due > datetime.now(UTC) else None

    async def _pushsafer(
        self, sender: Sender, action: dict[str, Any], payload: dict[str, Any]
    ) -> Outcome:
        alarm = payload.get("alarm", {})
        rule = payload.get("rule", {})
        event = payload.get("event", "raised")
        title = (
            action.get("title") or f"{alarm.get('severity', '')} {event}: {rule.get('name', '')}"
        )
        form = {
            "k": str(action["key"]),
            "d": str(action.get("device") or "a"),
            "t": str(title)[:255],
            "m": str(alarm.get("message") or rule.get("name") or "alarm")[:4000],
        }
        resp = await sender.post(self.settings.pushsafer_url, data=form)
        if isinstance(resp, Outcome):
            return resp
        outcome = sender.judge(resp)
        if outcome.ok:
            # Pushsafer answers {"status": 1, ...}, or status 0 with an error (a bad key).
            try:
                answer = resp.json()
            except ValueError:
                answer = None
            if isinstance(answer, dict) and answer.get("status") == 0:
                error = str(answer.get("error") or "refused")[:MAX_ERROR_CHARS]
                return Outcome(ok=False, status=resp.status_code, error=f"Pushsafer: {error}")
        return outcome

    @staticmethod
    async def _command(
        sender: Sender, delivery_id: int, target: str | None, action: dict[str, Any]
    ) -> Outcome:
        if not target:
            return Outcome(ok=False, error="no target device")
        request = {"method": action["method"], "params": action.get("params") or {}}
        topic = f"devices/{target}/methods/rules-{delivery_id}/req"
        return await sender.publish(topic, orjson.dumps(request))


class Deliverer:
    """The delivery workers: one loop per queue, woken by the queue's NOTIFY channel
    (polling covers a lost connection)."""

    def __init__(
        self,
        settings: RulesSettings,
        pool: asyncpg.Pool[Any],
        broker: Callable[[], mqtt.Client | None],
        *,
        extra_queues: Sequence[Queue] = (),
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.sender = Sender(settings, broker)
        self.queues: list[Queue] = [ActionQueue(settings, pool, metrics.ACTIONS), *extra_queues]
        self._wakes = {q.channel: asyncio.Event() for q in self.queues}

    def wake(self, _con: object, _pid: int, channel: str, _payload: object) -> None:
        event = self._wakes.get(channel)
        if event is not None:
            event.set()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(), name="rules.deliveries.listen")
                for queue in self.queues:
                    tg.create_task(self._deliver_loop(queue), name=f"rules.{queue.name}.deliver")
        finally:
            await self.sender.aclose()

    async def _listen(self) -> None:
        """Wake up as soon as work is queued (and at every (re)connection, in case a
        notification was missed meanwhile)."""
        await db.listen(
            self.settings.dsn, list(self._wakes), self.wake, on_listening=self._wake_all
        )

    def _wake_all(self) -> None:
        for event in self._wakes.values():
            event.set()

    async def _deliver_loop(self, queue: Queue) -> None:
        """Claim due rows whenever slots free up, and deliver each in its own task. At
        most twice ``concurrency`` rows are held (claimed, not finished) at once."""
        wake = self._wakes[queue.channel]
        slots = asyncio.Semaphore(queue.concurrency)
        capacity = 2 * queue.concurrency
        refill = max(1, capacity // 4)  # claim in batches, not one query per delivery
        held: dict[Hashable, int] = {}
        gates: dict[Hashable, asyncio.Semaphore] = {}
        running: set[asyncio.Task[None]] = set()

        async def run(row: asyncpg.Record, key: Hashable | None) -> None:
            try:
                if key is None:
                    async with slots:
                        await self._deliver(queue, row)
                else:
                    async with gates[key], slots:
                        await self._deliver(queue, row)
            finally:
                if key is not None:
                    held[key] -= 1
                    if not held[key]:
                        del held[key], gates[key]

        try:
            while True:
                free = capacity - len(running)
                if free >= refill or not running:
                    wake.clear()  # a notification from now on wakes the wait below
                    try:
                        claimed = await queue.claim(free, dict(held))
                    except Exception as exc:
                        log.warning("could not claim %s: %s", queue.name, exc)
                        claimed = []
                    for row in claimed:
                        key = queue.key(row)
                        if key is not None:
                            held[key] = held.get(key, 0) + 1
                            gates.setdefault(key, asyncio.Semaphore(queue.per_key))
                        running.add(
                            asyncio.create_task(
                                run(row, key), name=f"rules.{queue.name}.{row['id']}"
                            )
                        )
                woken = asyncio.ensure_future(wake.wait())
                try:
                    done, _ = await asyncio.wait(
                        {*running, woken}, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED
                    )
                finally:
                    woken.cancel()
                for task in done - {woken}:
                    running.discard(task)
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        log.error("a %s delivery task failed", queue.name, exc_info=error)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _deliver(self, queue: Queue, row: asyncpg.Record) -> None:
        delivery_id = row["id"]
        kind = queue.kind(row)
        outcome: Outcome | None
        try:
            outcome = await queue.attempt(row, self.sender)
            if outcome is None:
                return
        except Exception as exc:  # a bug in one delivery must not stop the others
            log.exception("%s delivery %s failed unexpectedly", queue.name, delivery_id)
            outcome = Outcome(ok=False, retry=True, error=f"internal error: {type(exc).__name__}")
        attempts = int(row["attempts"])
        retry = outcome.retry and attempts < self.settings.action_max_attempts
        try:
            if outcome.ok:
                await self.pool.execute(queue.delivered_sql, delivery_id, outcome.status)
            elif retry:
                await self.pool.execute(
                    queue.retry_sql,
                    delivery_id,
                    queue.backoff(attempts),
                    outcome.status,
                    outcome.error,
                )
            else:
                await self.pool.execute(
                    queue.failed_sql, delivery_id, outcome.status, outcome.error
                )
        except Exception as exc:  # the lease runs out and the delivery is tried again
            log.warning(
                "could not record the outcome of %s delivery %s: %s", queue.name, delivery_id, exc
            )
        result = "delivered" if outcome.ok else ("retry" if retry else "failed")
        queue.counter.labels(kind, result).inc()
        log.log(
            queue.success_log_level if outcome.ok else logging.WARNING,
            "%s delivery %s (%s, attempt %d): %s",
            queue.name,
            delivery_id,
            kind,
            attempts,
            result if outcome.ok else f"{result}: {outcome.error}",
            extra={**queue.describe(row), "status": outcome.status},
        )
