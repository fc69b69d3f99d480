"""Actions after an alarm moved: webhook, Pushsafer, device command.

They run from ``action_deliveries``, a queue written in the transaction that raised or
cleared the alarm, so a crash loses none: a worker claims due rows (``FOR UPDATE SKIP
LOCKED``, so replicas share them) for a lease; a worker that dies mid-delivery leaves
the row to be claimed again when the lease ends (at least once; webhooks carry
``X-Fleetline-Delivery`` so a receiver can drop a repeat). Failures are retried with
exponential backoff up to a number of attempts, then marked failed; every outcome is
in the row, which the API serves as the delivery log. Nothing here raises out of the
loop: a broken receiver never stops the service.

Secrets (webhook secrets, Pushsafer keys) are read from the row and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import httpx
import orjson

from fleetline import db
from fleetline.mqtt import backoff_seconds
from fleetline_rules import metrics
from fleetline_rules.settings import RulesSettings
from fleetline_rules.store import ACTIONS_CHANNEL

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
CLAIM_BATCH = 32
POLL_SECONDS = 1.0
MAX_ERROR_CHARS = 500
CLAIM = """
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
DELIVERED = """
UPDATE action_deliveries SET status = 'delivered', delivered_at = now(), locked_until = NULL,
       response_status = $2, last_error = NULL
WHERE id = $1
"""
RETRY = """
UPDATE action_deliveries SET next_attempt_at = now() + make_interval(secs => $2),
       locked_until = NULL, response_status = $3, last_error = $4
WHERE id = $1
"""
FAILED = """
UPDATE action_deliveries SET status = 'failed', locked_until = NULL, response_status = $2,
       last_error = $3
WHERE id = $1
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


class Deliverer:
    def __init__(
        self,
        settings: RulesSettings,
        pool: asyncpg.Pool[Any],
        broker: Callable[[], aiomqtt.Client | None],
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.broker = broker
        self._wake = asyncio.Event()
        self._http = httpx.AsyncClient(
            timeout=settings.action_timeout_seconds,
            headers={"User-Agent": "fleetline-rules"},
            follow_redirects=False,
        )

    def wake(self, *_args: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(), name="rules.actions.listen")
                tg.create_task(self._deliver_loop(), name="rules.actions.deliver")
        finally:
            await self._http.aclose()

    async def _listen(self) -> None:
        """Wake up as soon as actions are queued (polling covers a lost connection)."""
        attempt = 0
        while True:
            con: asyncpg.Connection[Any] | None = None
            try:
                con = await asyncpg.connect(self.settings.dsn, timeout=10)
                await con.add_listener(ACTIONS_CHANNEL, self.wake)
                attempt = 0
                while True:
                    await asyncio.sleep(10)
                    await con.fetchval("SELECT 1", timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("action listener lost the database: %s", exc)
            finally:
                if con is not None:
                    await db.close_connection(con)
            await asyncio.sleep(backoff_seconds(attempt))
            attempt += 1

    async def _deliver_loop(self) -> None:
        while True:
            try:
                claimed = await self.pool.fetch(CLAIM, CLAIM_BATCH, LEASE_SECONDS)
            except Exception as exc:
                log.warning("could not claim actions: %s", exc)
                claimed = []
            if claimed:
                await self._deliver_all(claimed)
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            self._wake.clear()

    async def _deliver_all(self, rows: list[asyncpg.Record]) -> None:
        # Commands go one after another (their rate limit reads the previous delivery);
        # HTTP actions run side by side, a few at a time.
        limit = asyncio.Semaphore(self.settings.action_concurrency)
        commands = [r for r in rows if r["action_type"] == "command"]
        others = [r for r in rows if r["action_type"] != "command"]

        async def one(row: asyncpg.Record) -> None:
            async with limit:
                await self._deliver(row)

        async def in_order() -> None:
            for row in commands:
                await self._deliver(row)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(in_order(), name="rules.actions.commands")
            for row in others:
                tg.create_task(one(row), name=f"rules.actions.{row['id']}")

    async def _deliver(self, row: asyncpg.Record) -> None:
        kind, delivery_id = row["action_type"], row["id"]
        try:
            if kind == "command":
                wait = await self._command_wait(row["target"])
                if wait is not None:
                    await self.pool.execute(POSTPONE, delivery_id, wait)
                    return
            outcome = await self._attempt(row)
        except Exception as exc:  # a bug in one action must not stop the others
            log.exception("action %s failed unexpectedly", delivery_id)
            outcome = Outcome(ok=False, retry=True, error=f"internal error: {type(exc).__name__}")
        attempts = int(row["attempts"])
        retry = outcome.retry and attempts < self.settings.action_max_attempts
        try:
            if outcome.ok:
                await self.pool.execute(DELIVERED, delivery_id, outcome.status)
            elif retry:
                delay = min(
                    self.settings.action_backoff_max_seconds,
                    self.settings.action_backoff_seconds * 2 ** (attempts - 1),
                )
                await self.pool.execute(RETRY, delivery_id, delay, outcome.status, outcome.error)
            else:
                await self.pool.execute(FAILED, delivery_id, outcome.status, outcome.error)
        except Exception as exc:  # the lease runs out and the delivery is tried again
            log.warning("could not record the outcome of action %s: %s", delivery_id, exc)
        result = "delivered" if outcome.ok else ("retry" if retry else "failed")
        metrics.ACTIONS.labels(kind, result).inc()
        log.log(
            logging.INFO if outcome.ok else logging.WARNING,
            "action %s (%s, attempt %d): %s",
            delivery_id,
            kind,
            attempts,
            result if outcome.ok else f"{result}: {outcome.error}",
            extra={"alarm_id": row["alarm_id"], "status": outcome.status},
        )

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

    async def _attempt(self, row: asyncpg.Record) -> Outcome:
        action: dict[str, Any] = row["action"]
        payload: dict[str, Any] = row["payload"]
        kind = row["action_type"]
        if kind == "webhook":
            return await self._webhook(row["id"], row["event"], action, payload)
        if kind == "pushsafer":
            return await self._pushsafer(action, payload)
        if kind == "command":
            return await self._command(row["id"], row["target"], action)
        return Outcome(ok=False, error=f"unknown action type {kind!r}")

    async def _post(self, url: str, **kwargs: Any) -> Outcome | httpx.Response:
        try:
            return await self._http.post(url, **kwargs)
        except httpx.TimeoutException:
            return Outcome(ok=False, retry=True, error="timed out")
        except httpx.HTTPError as exc:
            # The message names the failure (refused, DNS...), not the URL or the body.
            return Outcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}"[:500])

    @staticmethod
    def _judge(resp: httpx.Response) -> Outcome:
        code = resp.status_code
        if 200 <= code < 300:
            return Outcome(ok=True, status=code)
        # Server errors, rate limits and timeouts may pass; other refusals will not.
        retry = code >= 500 or code in (408, 425, 429)
        return Outcome(ok=False, retry=retry, status=code, error=f"HTTP {code}")

    async def _webhook(
        self, delivery_id: int, event: str, action: dict[str, Any], payload: dict[str, Any]
    ) -> Outcome:
        body = orjson.dumps(payload, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)
        headers = {
            "Content-Type": "application/json",
            "X-Fleetline-Delivery": str(delivery_id),
            "X-Fleetline-Event": event,
        }
        secret = action.get("secret")
        if secret:
            digest = hmac.new(str(secret).encode(), body, hashlib.sha256).hexdigest()
            headers["X-Fleetline-Signature"] = f"sha256={digest}"
        resp = await self._post(str(action["url"]), content=body, headers=headers)
        return resp if isinstance(resp, Outcome) else self._judge(resp)

    async def _pushsafer(self, action: dict[str, Any], payload: dict[str, Any]) -> Outcome:
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
        resp = await self._post(self.settings.pushsafer_url, data=form)
        if isinstance(resp, Outcome):
            return resp
        outcome = self._judge(resp)
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

    async def _command(
        self, delivery_id: int, target: str | None, action: dict[str, Any]
    ) -> Outcome:
        client = self.broker()
        if client is None or not target:
            return Outcome(ok=False, retry=True, error="not connected to the broker")
        request = {"method": action["method"], "params": action.get("params") or {}}
        topic = f"devices/{target}/methods/rules-{delivery_id}/req"
        try:
            await asyncio.wait_for(
                client.publish(topic, orjson.dumps(request), qos=1),
                self.settings.action_timeout_seconds,
            )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            return Outcome(ok=False, retry=True, error=f"publish failed: {exc}"[:MAX_ERROR_CHARS])
        return Outcome(ok=True)
