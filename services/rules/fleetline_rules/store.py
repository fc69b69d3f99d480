"""The rules service's tables (migrations/0010): rules in, state and alarms out.

Raises and clears are written at once, in one transaction per batch of messages with
everything they imply: the alarm row, its history event, the actions to run (a durable
queue), the rule state, and the stream notification (fleetline/streamevents.py), so
listeners hear of an alarm only once it is committed. Open alarms' value, peak and
count, and rate rules' previous values, are written in batches (:func:`flush`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from fleetline import rules_engine as engine
from fleetline import streamevents
from fleetline.rules_engine import Event, Phase, Rule, RuleDefinitionError, State
from fleetline_rules.evaluator import Change, Evaluator, Key

if TYPE_CHECKING:
    from fleetline.db import Connection

log = logging.getLogger(__name__)

# Announced after actions were queued, so the delivery worker starts at once.
ACTIONS_CHANNEL = "fleetline_actions"
ACTOR = "rules"

LOAD_RULES = """
SELECT id, name, match, kind, metric, raise_condition, clear_condition, timeout_s, severity,
       message, actions, version
FROM rules WHERE enabled ORDER BY id
"""
LOAD_TAGS = "SELECT id, tags FROM devices"
LOAD_RULE_STATE = """
SELECT rule_id, device_id, phase, since, last_ts, last_value
FROM rule_state WHERE rule_id = ANY($1::bigint[])
"""
ALARM_COLUMNS = """
id, rule_id, rule_name, device_id, metric, severity, state, raised_at, acknowledged_at,
acknowledged_by, cleared_at, cleared_by, value, peak, count, message, updated_at
"""
LOAD_OPEN_ALARMS = f"""
SELECT {ALARM_COLUMNS} FROM rule_alarms
WHERE state <> 'cleared' AND ($1::bigint[] IS NULL OR rule_id = ANY($1::bigint[]))
"""
LOAD_ACTIVITY = "SELECT device_id, last_seen, online, status_changed_at FROM device_activity"
SAVE_STATES = """
INSERT INTO rule_state AS s (rule_id, device_id, phase, since, last_ts, last_value, updated_at)
SELECT r, d, p, si, lt, lv, now()
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
            $6::float8[]) AS u(r, d, p, si, lt, lv)
WHERE EXISTS (SELECT 1 FROM rules WHERE id = u.r)
ON CONFLICT (rule_id, device_id) DO UPDATE SET
    phase = excluded.phase, since = excluded.since, last_ts = excluded.last_ts,
    last_value = excluded.last_value, updated_at = now()
"""
# A raise; when an open alarm already exists (another replica, or a restart that lost
# its memory), the partial unique index turns it into an update of that alarm.
RAISE = f"""
INSERT INTO rule_alarms AS a (rule_id, rule_name, device_id, metric, severity, state,
                              raised_at, value, peak, count, message)
SELECT $1::bigint, $2::text, $3::text, $4::text, $5::text, 'active', $6::timestamptz,
       $7::float8, $8::float8, $9::bigint, $10::text
WHERE EXISTS (SELECT 1 FROM rules WHERE id = $1 AND enabled)  -- not deleted meanwhile
ON CONFLICT (rule_id, device_id) WHERE state <> 'cleared' DO UPDATE SET
    count = a.count + excluded.count, value = excluded.value, message = excluded.message,
    updated_at = now()
RETURNING {ALARM_COLUMNS}, (xmax = 0) AS inserted
"""
SET_PEAK = f"UPDATE rule_alarms SET peak = $2 WHERE id = $1 RETURNING {ALARM_COLUMNS}"
CLEAR = f"""
UPDATE rule_alarms SET state = 'cleared', cleared_at = $3, cleared_by = '{ACTOR}',
       value = $4, peak = $5, count = $6, message = $7, updated_at = now()
WHERE rule_id = $1 AND device_id = $2 AND state <> 'cleared'
RETURNING {ALARM_COLUMNS}
"""
UPDATE_OPEN = f"""
UPDATE rule_alarms a SET value = u.value, peak = u.peak, count = u.count,
       message = u.message, updated_at = now()
FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::float8[], $5::bigint[], $6::text[])
    AS u(rule_id, device_id, value, peak, count, message)
WHERE a.rule_id = u.rule_id AND a.device_id = u.device_id AND a.state <> 'cleared'
  AND (a.value, a.peak, a.count, a.message)
      IS DISTINCT FROM (u.value, u.peak, u.count, u.message)
RETURNING {", ".join("a." + c.strip() for c in ALARM_COLUMNS.split(","))}
"""
OPEN_KEYS = """
SELECT rule_id, device_id FROM rule_alarms
WHERE state <> 'cleared' AND rule_id = ANY($1::bigint[]) AND device_id = ANY($2::text[])
"""
HISTORY = "INSERT INTO alarm_events (alarm_id, at, event, actor, value) VALUES ($1, $2, $3, $4, $5)"
ENQUEUE = """
INSERT INTO action_deliveries (alarm_id, rule_id, event, action_index, action_type, action,
                               payload, target)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""


def alarm_doc(row: Mapping[str, Any]) -> dict[str, Any]:
    """An alarm as REST and the stream show it."""
    return {k.strip(): row[k.strip()] for k in ALARM_COLUMNS.split(",")}


async def load_rules(con: Connection) -> list[Rule]:
    rules = []
    for row in await con.fetch(LOAD_RULES):
        try:
            rules.append(Rule.from_row(dict(row)))
        except (RuleDefinitionError, TypeError, ValueError, KeyError) as exc:
            log.error("skipping rule %s: %s", row["id"], exc)
    return rules


async def load_tags(con: Connection) -> dict[str, dict[str, Any]]:
    return {r["id"]: r["tags"] for r in await con.fetch(LOAD_TAGS)}


def _state_from_alarm(state: State, row: Mapping[str, Any]) -> None:
    state.value, state.peak, state.count = row["value"], row["peak"], int(row["count"])


async def load_states(con: Connection, rules: Mapping[int, Rule]) -> dict[Key, State]:
    """The persisted state of these rules: timers from rule_state, and open alarms."""
    ids = list(rules)
    states: dict[Key, State] = {}
    for row in await con.fetch(LOAD_RULE_STATE, ids):
        state = State(last_ts=row["last_ts"], last_value=row["last_value"])
        phase = Phase(row["phase"])
        if phase in (Phase.PENDING, Phase.CLEARING) and row["since"] is not None:
            state.phase, state.since = phase, row["since"]
        states[(row["rule_id"], row["device_id"])] = state
    for row in await con.fetch(LOAD_OPEN_ALARMS, ids):
        key = (row["rule_id"], row["device_id"])
        state = states.get(key) or State()
        if state.phase is not Phase.CLEARING:
            state.phase, state.since = Phase.ACTIVE, None
        _state_from_alarm(state, row)
        rule = rules.get(key[0])
        if rule is not None and rule.kind == "no_data":
            state.offline = True  # cleared only by a sign of life
            state.last_ts = state.last_ts or row["raised_at"]
        states[key] = state
    # A state row left active or clearing by an alarm cleared meanwhile is idle.
    for state in states.values():
        if state.phase in (Phase.ACTIVE, Phase.CLEARING) and state.count == 0:
            state.phase, state.since = Phase.IDLE, None
    return states


async def load_activity(
    con: Connection | asyncpg.Pool[Any],
) -> list[tuple[str, datetime | None, bool | None, datetime | None]]:
    return [
        (r["device_id"], r["last_seen"], r["online"], r["status_changed_at"])
        for r in await con.fetch(LOAD_ACTIVITY)
    ]


def _state_arrays(keys: Iterable[Key], states: Mapping[Key, State]) -> list[list[Any]]:
    cols: list[list[Any]] = [[], [], [], [], [], []]
    for key in keys:
        state = states.get(key)
        if state is None:
            continue
        for col, value in zip(
            cols,
            (key[0], key[1], state.phase.value, state.since, state.last_ts, state.last_value),
            strict=True,
        ):
            col.append(value)
    return cols


def _deliveries(rule: Rule, event: str, doc: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for index, action in enumerate(rule.actions):
        if event not in action.get("on", ["raised"]):
            continue
        kind = action.get("type")
        target = None
        if kind == "command":
            target = action.get("device_id") or doc["device_id"]
        payload = {"event": event, "alarm": dict(doc), "rule": {"id": rule.id, "name": rule.name}}
        rows.append((doc["id"], rule.id, event, index, kind, dict(action), payload, target))
    return rows


async def write(
    con: Connection, changes: Sequence[Change], evaluator: Evaluator, *, notify: bool = True
) -> int:
    """Persist transitions (in the caller's transaction); returns actions queued.
    ``notify``: announce the alarms on the stream and wake the action worker (off while
    PostgreSQL's NOTIFY queue is full: the worker polls)."""
    events: list[dict[str, Any]] = []
    queued = 0
    touched: dict[Key, None] = {}
    for change in changes:
        rule, device_id, t = change.rule, change.device_id, change.transition
        key = (rule.id, device_id)
        touched[key] = None
        message = engine.render(rule, device_id, t.value, t.peak, t.count)
        if t.event is Event.RAISED:
            row = await con.fetchrow(
                RAISE,
                rule.id,
                rule.name,
                device_id,
                rule.metric,
                rule.severity,
                t.at,
                t.value,
                t.peak,
                t.count,
                message,
            )
            if row is None:
                continue  # the rule was deleted or disabled since it was loaded
            inserted = bool(row["inserted"])
            if not inserted:
                # Merged into the open alarm: keep the more extreme peak of the two.
                cond = rule.raise_when
                old, new = row["peak"], t.peak
                if (
                    cond is not None
                    and new is not None
                    and (old is None or cond.extremity(new) > cond.extremity(old))
                ):
                    row = await con.fetchrow(SET_PEAK, row["id"], new)
                    assert row is not None
                state = evaluator.states.get(key)
                if state is not None and state.phase is not Phase.IDLE:
                    _state_from_alarm(state, row)
            doc = alarm_doc(row)
            if inserted:
                await con.execute(HISTORY, doc["id"], t.at, "raised", ACTOR, t.value)
                for delivery in _deliveries(rule, "raised", doc):
                    await con.execute(ENQUEUE, *delivery)
                    queued += 1
            events.append(streamevents.alarm_event(doc, t.at))
        elif t.event is Event.CLEARED:
            row = await con.fetchrow(
                CLEAR, rule.id, device_id, t.at, t.value, t.peak, t.count, message
            )
            if row is None:
                continue  # cleared by hand meanwhile
            doc = alarm_doc(row)
            await con.execute(HISTORY, doc["id"], t.at, "cleared", ACTOR, t.value)
            for delivery in _deliveries(rule, "cleared", doc):
                await con.execute(ENQUEUE, *delivery)
                queued += 1
            events.append(streamevents.alarm_event(doc, t.at))
    if touched:
        await con.execute(SAVE_STATES, *_state_arrays(touched, evaluator.states))
    if notify:
        await streamevents.announce(con, events)
        if queued:
            await con.execute("SELECT pg_notify($1, '')", ACTIONS_CHANNEL)
    return queued


async def flush(
    con: Connection, evaluator: Evaluator, now: datetime, *, notify: bool = True
) -> list[Key]:
    """Write open alarms' new figures and rate rules' previous values (announced on the
    stream unless ``notify`` is off); returns the keys whose alarm is no longer open
    (cleared by hand): the caller starts them over."""
    dirty, evaluator.dirty = evaluator.dirty, set()
    rates, evaluator.dirty_rates = evaluator.dirty_rates, set()
    gone: list[Key] = []
    if dirty:
        cols: list[list[Any]] = [[], [], [], [], [], []]
        for key in dirty:
            state = evaluator.states.get(key)
            rule = evaluator.rules.rules.get(key[0])
            if state is None or rule is None or state.phase not in (Phase.ACTIVE, Phase.CLEARING):
                continue
            message = engine.render(rule, key[1], state.value, state.peak, state.count)
            for col, value in zip(
                cols, (key[0], key[1], state.value, state.peak, state.count, message), strict=True
            ):
                col.append(value)
        if cols[0]:
            rows = await con.fetch(UPDATE_OPEN, *cols)
            if rows and notify:
                await streamevents.announce(
                    con, [streamevents.alarm_event(alarm_doc(r), now) for r in rows]
                )
            if len(rows) < len(cols[0]):
                # Unchanged rows are not returned either: ask which are still open.
                still = {
                    (r["rule_id"], r["device_id"])
                    for r in await con.fetch(OPEN_KEYS, cols[0], cols[1])
                }
                gone = [k for k in zip(cols[0], cols[1], strict=True) if k not in still]
    if rates:
        await con.execute(SAVE_STATES, *_state_arrays(rates, evaluator.states))
    return gone


def decode_notification(payload: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}
