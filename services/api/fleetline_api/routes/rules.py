"""Rules: CRUD, and a backtest over stored telemetry.

Every write notifies ``fleetline_rules`` in its transaction, so the rules service
reloads as soon as the change is committed (it also reloads periodically). Changing a
rule restarts its timers (its ``rule_state`` rows go); disabling or deleting it clears
its open alarms, which would otherwise stay open with nothing to clear them.

Reading rules needs ``rules:write`` or ``telemetry:read``: a rule is a view on
telemetry, and a dashboard that shows a fleet's readings and alarms should be able to
say which rule raised them; secrets are masked in every response, so reading a rule
reveals nothing a telemetry reader could not see.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Response
from pydantic import BaseModel, StringConstraints

from fleetline import db, rules_engine, streamevents
from fleetline_api.deps import PoolDep, RulesRead, RulesWrite, actor
from fleetline_api.openapi import links
from fleetline_api.problems import NOT_FOUND, RESPONSES
from fleetline_api.queries import rules as sql
from fleetline_api.schemas.rules import (
    MASK,
    SECRET_FIELDS,
    Backtest,
    BacktestAlarm,
    CommandAction,
    NoDataRule,
    Outside,
    PushsaferAction,
    RuleIn,
    RulePage,
    RulePublic,
    ThresholdRule,
    WebhookAction,
    masked,
)

router = APIRouter(prefix="/v1/rules", tags=["rules"], responses=RESPONSES)

RuleId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# A command's params are stored as JSON and sent to a device: keep them small and exact.
MAX_PARAMS_BYTES = 8192
MAX_SAFE_INT = 2**53
# Backtest bounds: readings replayed in one request, and the default range.
MAX_BACKTEST_READINGS = 500_000
DEFAULT_BACKTEST_RANGE = timedelta(hours=24)
# An RFC 3339 time with its offset, years 1970-8999 (no reading lies outside); the
# pattern checks the range of each field.
Time = Annotated[
    str,
    StringConstraints(
        pattern=r"^(19[7-9]\d|[2-8]\d{3})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
        r"[Tt ]([01]\d|2[0-3]):[0-5]\d"
        r"(:[0-5]\d(\.\d{1,9})?)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$"
    ),
]


def public(row: Any) -> RulePublic:
    return RulePublic.model_validate(
        {
            "id": row["id"],
            "name": row["name"],
            "kind": row["kind"],
            "match": row["match"],
            "metric": row["metric"],
            "raise": row["raise_condition"],
            "clear": row["clear_condition"],
            "timeout_s": row["timeout_s"],
            "severity": row["severity"],
            "message": row["message"],
            "actions": masked(row["actions"]),
            "enabled": row["enabled"],
            "version": row["version"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
        }
    )


def _dump(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else model.model_dump(mode="json", exclude_none=True)


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > 16:
        raise HTTPException(400, "command params are nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1)
            _check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)
    elif isinstance(value, str):
        if "\x00" in value:
            raise HTTPException(400, "command params may not contain NUL characters")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INT:
        raise HTTPException(400, "command params: integers must lie within ±2^53")


def _columns(body: ThresholdRule | NoDataRule, stored: list[dict[str, Any]]) -> list[Any]:
    """The rule's column values; masked secrets take the stored action's secret."""
    actions: list[dict[str, Any]] = []
    for index, action in enumerate(body.actions):
        doc = action.model_dump(mode="json", exclude_none=True)
        for name in SECRET_FIELDS:
            if doc.get(name) != MASK:
                continue
            old = stored[index] if index < len(stored) else {}
            if old.get("type") != doc["type"] or not old.get(name):
                raise HTTPException(
                    400, f"actions[{index}].{name} is masked but no such secret is stored"
                )
            doc[name] = old[name]
        if isinstance(action, CommandAction):
            _check_json(action.params)
            if len(orjson.dumps(action.params)) > MAX_PARAMS_BYTES:
                raise HTTPException(400, f"command params must be at most {MAX_PARAMS_BYTES} bytes")
        assert isinstance(action, WebhookAction | PushsaferAction | CommandAction)
        actions.append(doc)
    match = body.match.model_dump(mode="json")
    if isinstance(body, ThresholdRule):
        for cond in (body.raise_, body.clear):
            if isinstance(cond, Outside) and cond.low > cond.high:
                raise HTTPException(400, "'outside' needs low <= high")
        return [
            body.name,
            match,
            "threshold",
            body.metric,
            _dump(body.raise_),
            _dump(body.clear),
            None,
            body.severity,
            body.message,
            actions,
            body.enabled,
        ]
    return [
        body.name,
        match,
        "no_data",
        None,
        None,
        None,
        body.timeout_s,
        body.severity,
        body.message,
        actions,
        body.enabled,
    ]


def _notify_rule(notices: db.Notices, rule_id: int) -> None:
    notices.add(rules_engine.RULES_CHANNEL, orjson.dumps({"rule_id": rule_id}).decode())


async def clear_open_alarms(
    con: db.Connection, notices: db.Notices, rule_id: int, actor: str
) -> None:
    """Clear a rule's open alarms and announce it on the stream (in the caller's
    transaction)."""
    rows = await con.fetch(sql.CLEAR_OPEN, rule_id, actor)
    notices.add(
        streamevents.CHANNEL,
        *streamevents.pack([streamevents.alarm_event(r, r["cleared_at"]) for r in rows]),
    )


@router.get("", summary="List rules", response_model=RulePage, response_model_by_alias=True)
async def list_rules(
    pool: PoolDep,
    _key: RulesRead,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> RulePage:
    """Rules by id."""
    rows = await pool.fetch(sql.LIST_RULES, cursor, limit + 1)
    items = [public(r) for r in rows[:limit]]
    return RulePage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


@router.post(
    "",
    summary="Create a rule",
    status_code=201,
    response_model=RulePublic,
    response_model_by_alias=True,
    responses={
        201: {
            "description": "The rule (secrets masked)",
            "links": links(
                "/id",
                "GetRule:rules-get_rule:rule_id",
                "ReplaceRule:rules-replace_rule:rule_id",
                "DeleteRule:rules-delete_rule:rule_id",
                "BacktestRule:rules-backtest_rule:rule_id",
            ),
        }
    },
)
async def create_rule(body: RuleIn, pool: PoolDep, _key: RulesWrite) -> RulePublic:
    """Create a rule; the rules service evaluates it from the next reading on."""
    values = _columns(body, [])

    async def work(con: db.Connection, notices: db.Notices) -> Any:
        row = await con.fetchrow(sql.INSERT_RULE, *values)
        assert row is not None
        _notify_rule(notices, row["id"])
        return row

    return public(await db.notifying(pool, work, what="rule creation"))


@router.get(
    "/{rule_id}",
    response_model=RulePublic,
    response_model_by_alias=True,
    responses=NOT_FOUND,
    summary="Get a rule",
)
async def get_rule(rule_id: RuleId, pool: PoolDep, _key: RulesRead) -> RulePublic:
    """One rule (secrets masked)."""
    row = await pool.fetchrow(sql.SELECT_RULE, rule_id)
    if row is None:
        raise HTTPException(404, f"rule {rule_id} not found")
    return public(row)


@router.put(
    "/{rule_id}",
    response_model=RulePublic,
    response_model_by_alias=True,
    responses=NOT_FOUND,
    summary="Replace a rule",
)
async def replace_rule(rule_id: RuleId, body: RuleIn, pool: PoolDep, key: RulesWrite) -> RulePublic:
    """Replace a rule. Its timers restart; open alarms stay open and clear by the new
    clear condition (or are cleared now if the rule is disabled). A secret sent back as
    ``********`` keeps the stored one."""

    async def work(con: db.Connection, notices: db.Notices) -> Any:
        stored = await con.fetchval(sql.LOCK_ACTIONS, rule_id)
        if stored is None:
            raise HTTPException(404, f"rule {rule_id} not found")
        row = await con.fetchrow(sql.UPDATE_RULE, rule_id, *_columns(body, stored))
        assert row is not None
        await con.execute(sql.DELETE_STATE, rule_id)
        if not body.enabled:
            await clear_open_alarms(con, notices, rule_id, f"rule disabled by {actor(key)}")
        _notify_rule(notices, rule_id)
        return row

    return public(await db.notifying(pool, work, what=f"rule {rule_id} change"))


@router.delete("/{rule_id}", summary="Delete a rule", status_code=204, responses=NOT_FOUND)
async def delete_rule(rule_id: RuleId, pool: PoolDep, key: RulesWrite) -> Response:
    """Delete a rule; its open alarms are cleared (and kept in the history)."""

    async def work(con: db.Connection, notices: db.Notices) -> None:
        status = await con.execute(sql.DELETE_RULE, rule_id)
        if status.endswith(" 0"):
            raise HTTPException(404, f"rule {rule_id} not found")
        await clear_open_alarms(con, notices, rule_id, f"rule deleted by {actor(key)}")
        _notify_rule(notices, rule_id)

    await db.notifying(pool, work, what=f"rule {rule_id} deletion")
    return Response(status_code=204)


def _time(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.upper().replace(" ", "T")).astimezone(UTC)
    except (ValueError, OverflowError):  # 30 February, year 1 with a positive offset
        raise HTTPException(400, f"'{name}' {text!r} is not a valid time") from None


@router.post(
    "/{rule_id}/backtest",
    summary="Backtest a rule on stored readings",
    response_model=Backtest,
    response_model_by_alias=True,
    responses=NOT_FOUND,
)
async def backtest_rule(
    rule_id: RuleId,
    pool: PoolDep,
    _key: RulesRead,
    start: Annotated[Time | None, Query(alias="from", description="Default: to - 24 h")] = None,
    end: Annotated[Time | None, Query(alias="to", description="Default: now")] = None,
) -> Backtest:
    """Replay the stored readings of ``[from, to)`` through the rule, with the same
    evaluation code as the rules service, and return the alarms it would have raised
    (nothing is stored, no action runs); a range with ``from`` at or after ``to`` holds
    no readings. Time is the readings' own; the clock is moved
    to ``to`` at the end, so a condition still holding then raises if it held long
    enough. no_data rules see readings only (status messages are not stored)."""
    row = await pool.fetchrow(sql.SELECT_RULE, rule_id)
    if row is None:
        raise HTTPException(404, f"rule {rule_id} not found")
    until = _time("to", end) or datetime.now(UTC)
    since = _time("from", start) or until - DEFAULT_BACKTEST_RANGE
    rule = rules_engine.Rule.from_row(dict(row))
    where = [sorted(rule.devices), dict(rule.tags), since, until, MAX_BACKTEST_READINGS + 1]
    if rule.kind == "threshold":
        readings = await pool.fetch(sql.BACKTEST_THRESHOLD, rule.metric, *where)
    else:
        readings = await pool.fetch(sql.BACKTEST_NO_DATA, *where)
    if len(readings) > MAX_BACKTEST_READINGS:
        raise HTTPException(
            400, f"more than {MAX_BACKTEST_READINGS} readings in range: narrow 'from'/'to'"
        )
    alarms = rules_engine.replay(
        rule, ((r["device_id"], r["time"], r["value"]) for r in readings), until
    )
    return Backtest.model_validate(
        {
            "rule_id": rule_id,
            "from": since,
            "to": until,
            "readings": len(readings),
            "alarms": [
                BacktestAlarm(
                    device_id=a.device_id,
                    raised_at=a.raised_at,
                    cleared_at=a.cleared_at,
                    value=a.value,
                    peak=a.peak,
                    count=a.count,
                    message=a.message,
                )
                for a in alarms
            ],
        }
    )
