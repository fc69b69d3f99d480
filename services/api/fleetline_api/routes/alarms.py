"""Alarms: list and filter, acknowledge, clear, history, action deliveries.

The rules service raises, updates and clears alarms; these routes move them on a
person's decision: ``active → acknowledged``, and ``active|acknowledged → cleared``,
each recorded with who (the API key) and when, announced on ``/v1/stream``, and
answered 409 when the alarm is not in a state that allows it. A manual clear also
tells the rules service (NOTIFY fleetline_rules), which starts that (rule, device) over:
if the condition still holds, a new alarm is raised after the rule's ``for_s``.

Reading needs ``rules:write`` or ``telemetry:read`` (see routes/rules.py); moving an
alarm needs ``rules:write``.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query

from fleetline import db, rules_engine, streamevents
from fleetline_api.deps import PoolDep, RulesRead, RulesWrite, actor
from fleetline_api.openapi import links
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.schemas.common import DeviceId
from fleetline_api.schemas.rules import (
    AlarmEvent,
    AlarmPage,
    AlarmPublic,
    AlarmState,
    Delivery,
    Severity,
    masked,
)

router = APIRouter(prefix="/v1/alarms", tags=["alarms"], responses=RESPONSES)

AlarmId = Annotated[int, Path(ge=1, le=2**63 - 1)]
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "The alarm's state does not allow this"}
}
COLUMNS = """
id, rule_id, rule_name, device_id, metric, severity, state, raised_at, acknowledged_at,
acknowledged_by, cleared_at, cleared_by, value, peak, count, message, updated_at
"""
ACK = f"""
UPDATE rule_alarms SET state = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2,
       updated_at = now()
WHERE id = $1 AND state = 'active'
RETURNING {COLUMNS}
"""
CLEAR = f"""
UPDATE rule_alarms SET state = 'cleared', cleared_at = now(), cleared_by = $2, updated_at = now()
WHERE id = $1 AND state IN ('active', 'acknowledged')
RETURNING {COLUMNS}
"""
HISTORY = "INSERT INTO alarm_events (alarm_id, at, event, actor, value) VALUES ($1, $2, $3, $4, $5)"


@router.get(
    "",
    response_model=AlarmPage,
    responses={
        200: {
            "description": "A page of alarms",
            "links": links(
                "/items/0/id",
                "GetAlarm:alarms-get_alarm:alarm_id",
                "AcknowledgeAlarm:alarms-acknowledge_alarm:alarm_id",
                "ClearAlarm:alarms-clear_alarm:alarm_id",
                "AlarmHistory:alarms-alarm_history:alarm_id",
                "AlarmDeliveries:alarms-alarm_deliveries:alarm_id",
            ),
        }
    },
)
async def list_alarms(
    pool: PoolDep,
    _key: RulesRead,
    state: Annotated[AlarmState | None, Query()] = None,
    device_id: Annotated[DeviceId | None, Query()] = None,
    rule_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    severity: Annotated[Severity | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> AlarmPage:
    """Newest first, filtered by state, device, rule and severity."""
    rows = await pool.fetch(
        f"""
        SELECT {COLUMNS} FROM rule_alarms
        WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR device_id = $2)
          AND ($3::bigint IS NULL OR rule_id = $3) AND ($4::text IS NULL OR severity = $4)
          AND ($5::bigint IS NULL OR id < $5)
        ORDER BY id DESC
        LIMIT $6
        """,
        state,
        device_id,
        rule_id,
        severity,
        cursor,
        limit + 1,
    )
    items = [AlarmPublic(**dict(r)) for r in rows[:limit]]
    return AlarmPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


async def _get(con: db.Queryable, alarm_id: int) -> AlarmPublic:
    row = await con.fetchrow(f"SELECT {COLUMNS} FROM rule_alarms WHERE id = $1", alarm_id)
    if row is None:
        raise HTTPException(404, f"alarm {alarm_id} not found")
    return AlarmPublic(**dict(row))


@router.get("/{alarm_id}", response_model=AlarmPublic, responses=NOT_FOUND)
async def get_alarm(alarm_id: AlarmId, pool: PoolDep, _key: RulesRead) -> AlarmPublic:
    """One alarm."""
    return await _get(pool, alarm_id)


async def _move(
    pool: Any, alarm_id: int, sql: str, event: str, actor: str, allowed: str
) -> AlarmPublic:

    async def work(con: db.Connection, notices: db.Notices) -> AlarmPublic:
        row = await con.fetchrow(sql, alarm_id, actor)
        if row is None:
            current = await _get(con, alarm_id)  # 404 when there is none
            raise HTTPException(
                409, f"alarm {alarm_id} is {current.state}: only {allowed} alarms can be {event}"
            )
        alarm = AlarmPublic(**dict(row))
        at = alarm.acknowledged_at if event == "acknowledged" else alarm.cleared_at
        await con.execute(HISTORY, alarm.id, at, event, actor, alarm.value)
        notices.add(
            streamevents.CHANNEL,
            *streamevents.pack([streamevents.alarm_event(alarm.model_dump(), at)]),
        )
        if event == "cleared":
            notices.add(
                rules_engine.RULES_CHANNEL,
                orjson.dumps({"cleared": [alarm.rule_id, alarm.device_id]}).decode(),
            )
        return alarm

    return await db.notifying(pool, work, what=f"alarm {alarm_id} {event}")


@router.post("/{alarm_id}/ack", response_model=AlarmPublic, responses={**NOT_FOUND, **CONFLICT})
async def acknowledge_alarm(alarm_id: AlarmId, pool: PoolDep, key: RulesWrite) -> AlarmPublic:
    """Acknowledge an active alarm (409 if it is acknowledged or cleared already). It
    stays open, and clears when its rule's clear condition holds."""
    return await _move(pool, alarm_id, ACK, "acknowledged", actor(key), "active")


@router.post("/{alarm_id}/clear", response_model=AlarmPublic, responses={**NOT_FOUND, **CONFLICT})
async def clear_alarm(alarm_id: AlarmId, pool: PoolDep, key: RulesWrite) -> AlarmPublic:
    """Clear an active or acknowledged alarm by hand (409 if it is cleared already)."""
    return await _move(pool, alarm_id, CLEAR, "cleared", actor(key), "active or acknowledged")


@router.get("/{alarm_id}/history", response_model=list[AlarmEvent], responses=NOT_FOUND)
async def alarm_history(alarm_id: AlarmId, pool: PoolDep, _key: RulesRead) -> list[AlarmEvent]:
    """Every move of the alarm, oldest first: raised, acknowledged, cleared, with who."""
    async with pool.acquire() as con:
        await _get(con, alarm_id)
        rows = await con.fetch(
            "SELECT at, event, actor, value FROM alarm_events WHERE alarm_id = $1 ORDER BY id",
            alarm_id,
        )
    return [AlarmEvent(**dict(r)) for r in rows]


@router.get("/{alarm_id}/deliveries", response_model=list[Delivery], responses=NOT_FOUND)
async def alarm_deliveries(alarm_id: AlarmId, pool: PoolDep, _key: RulesRead) -> list[Delivery]:
    """The actions the alarm's moves ran: status, attempts, last error, next retry
    (the delivery log; secrets masked)."""
    async with pool.acquire() as con:
        await _get(con, alarm_id)
        rows = await con.fetch(
            """
            SELECT id, event, action_index, action_type, action, target, status, attempts,
                   next_attempt_at, last_error, response_status, created_at, delivered_at
            FROM action_deliveries WHERE alarm_id = $1 ORDER BY id
            """,
            alarm_id,
        )
    return [Delivery(**{**dict(r), "action": masked([r["action"]])[0]}) for r in rows]
