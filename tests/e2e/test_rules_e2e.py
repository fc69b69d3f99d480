"""The rules service killed with -9 and restarted, and two replicas side by side: alarms
are neither lost nor duplicated (real broker, real database, real processes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_rules import (
    alarms_of,
    eventually,
    now_ms,
    rules_env,
    rules_loaded,
    threshold_rule,
)
from tests.support import ApiProcess, Device, RulesProcess

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
async def _only_our_rules(db: asyncpg.Pool[Any]) -> None:
    # Rules other tests left enabled would keep these processes busy.
    await db.execute("UPDATE rules SET enabled = false WHERE enabled")


async def test_kill_9_with_a_pending_and_an_active_alarm_loses_and_duplicates_nothing(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_rules: Callable[..., RulesProcess],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    admin = httpx.Client(
        base_url=api.url, timeout=10, headers={"Authorization": f"Bearer {await make_key('admin')}"}
    )
    active, pending = f"{uid}-active", f"{uid}-pending"
    env = rules_env(uid)
    rules = start_rules(env=env)
    rule = admin.post(
        "/v1/rules",
        json=threshold_rule(f"{uid} hot", [active, pending])
        | {"raise": {"op": ">", "value": 30, "for_s": 2}},
    ).json()
    await rules_loaded(rules, db)
    a, p = Device(broker.url, active), Device(broker.url, pending)
    a.publish_all([{"ts": now_ms(), "values": {"temp": 35}}])
    (raised,) = await eventually(lambda: alarms_of(db, rule["id"]), timeout=5, what="raise")
    assert raised["device_id"] == active

    pending_from = now_ms()
    p.publish_all([{"ts": pending_from, "values": {"temp": 40}}])
    await eventually(
        lambda: db.fetchval(
            "SELECT phase = 'pending' FROM rule_state WHERE rule_id = $1 AND device_id = $2",
            rule["id"],
            pending,
        ),
        what="the pending timer to be stored",
    )
    rules.kill()

    # While it is down: the active device reports again (the broker queues it for the
    # service's session), and the pending device's for_s runs out.
    a.publish_all([{"ts": now_ms(), "values": {"temp": 36}}])
    await asyncio.sleep(2.5)
    assert len(await alarms_of(db, rule["id"])) == 1
    start_rules(env=env)

    rows = await eventually(
        lambda: _by_device(db, rule["id"], pending), timeout=5, what="the pending alarm"
    )
    assert rows["raised_at"] == datetime.fromtimestamp(pending_from / 1000, UTC) + timedelta(
        seconds=2
    ), "raised when its for_s ran out, while the service was down"
    # The queued reading updated the open alarm; a new one updates it again.
    a.publish_all([{"ts": now_ms(), "values": {"temp": 37}}])
    await eventually(
        lambda: db.fetchval(
            "SELECT count = 3 AND value = 37 AND peak = 37 FROM rule_alarms WHERE id = $1",
            raised["id"],
        ),
        what="the active alarm updated",
    )
    per_device = await db.fetch(
        "SELECT device_id, count(*) AS n FROM rule_alarms WHERE rule_id = $1 GROUP BY 1", rule["id"]
    )
    assert {r["device_id"]: r["n"] for r in per_device} == {active: 1, pending: 1}
    a.close()
    p.close()


async def _by_device(db: asyncpg.Pool[Any], rule_id: int, device_id: str) -> Any:
    return await db.fetchrow(
        "SELECT * FROM rule_alarms WHERE rule_id = $1 AND device_id = $2", rule_id, device_id
    )


async def test_two_replicas_sharing_the_subscription_raise_one_alarm(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_rules: Callable[..., RulesProcess],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    admin = httpx.Client(
        base_url=api.url, timeout=10, headers={"Authorization": f"Bearer {await make_key('admin')}"}
    )
    replicas = [
        start_rules(
            env=rules_env(uid) | {"FLEETLINE_RULES_CLIENT_ID": f"test-rules-{uid}-{i}"},
            name=f"{uid}-{i}",
        )
        for i in range(2)
    ]
    devices = [f"{uid}-{i}" for i in range(5)]
    rule = admin.post(
        "/v1/rules",
        json=threshold_rule(f"{uid} shared", devices)
        | {"raise": {"op": ">", "value": 30, "for_s": 0}},
    ).json()
    for replica in replicas:
        await rules_loaded(replica, db)
    pubs = [Device(broker.url, d) for d in devices]
    for i in range(10):
        for dev in pubs:
            dev.publish_all([{"ts": now_ms(), "values": {"temp": 31 + i}}])
    await eventually(
        lambda: db.fetchval(
            "SELECT count(DISTINCT device_id) = 5 FROM rule_alarms WHERE rule_id = $1", rule["id"]
        ),
        what="alarms",
    )
    await asyncio.sleep(0.5)
    # Both replicas evaluated readings (Mosquitto hands them out in turn)...
    assert all(r.metric("fleetline_rules_evaluations_total") > 0 for r in replicas)
    # ...and each device has one alarm.
    rows = await db.fetch(
        "SELECT device_id, count(*) AS n FROM rule_alarms WHERE rule_id = $1 GROUP BY 1", rule["id"]
    )
    assert sorted((r["device_id"], r["n"]) for r in rows) == [(d, 1) for d in sorted(devices)]
    for dev in pubs:
        dev.close()
