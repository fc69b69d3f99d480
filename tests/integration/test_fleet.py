"""/v1/fleet: the fleet's counts under the filters of GET /v1/devices, counted in the
database, and how far back telemetry reaches (what the dashboard's charts offer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.integration.test_api import assert_problem, client
from tests.integration.test_jobs import offline, register
from tests.support import ApiProcess

pytestmark = pytest.mark.integration


async def test_counts_follow_the_filters_and_retention_the_settings(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    await register(db, [f"{uid}-on-{i}" for i in range(3)], {"run": uid, "site": "A"},
                   online=True)
    await register(db, [f"{uid}-off-{i}" for i in range(2)], {"run": uid, "site": "B"})
    gateway = f"{uid}-gw"
    await db.execute("INSERT INTO devices (id, gateway) VALUES ($1, '{}')", gateway)
    await db.execute("INSERT INTO devices (id, parent_id, tags) VALUES ($1, $2, $3::jsonb)",
                     f"{uid}-child", gateway, f'{{"run": "{uid}"}}')
    try:
        with client(api, await make_key("devices:read")) as reader:
            counts = reader.get("/v1/fleet/counts", params={"tag": f"run={uid}"}).json()
            assert counts == {"total": 6, "online": 3, "offline": 3}
            site_a = reader.get("/v1/fleet/counts", params=[("tag", f"run={uid}"),
                                                            ("tag", "site=A")]).json()
            assert site_a == {"total": 3, "online": 3, "offline": 0}
            children = reader.get("/v1/fleet/counts", params={"parent": gateway}).json()
            assert children == {"total": 1, "online": 0, "offline": 1}
            clash = [("tag", f"run={uid}"), ("tag", "run=other")]
            assert reader.get("/v1/fleet/counts", params=clash).json()["total"] == 0
            assert_problem(reader.get("/v1/fleet/counts", params={"tag": "no-equals"}), 422)
            # Telemetry's reach is for telemetry:read.
            assert_problem(reader.get("/v1/fleet/retention"), 403)
        with client(api, await make_key("telemetry:read")) as charts:
            assert charts.get("/v1/fleet/retention").json() == {
                "raw_s": 90 * 86400, "minute_rollups_s": 90 * 86400,
                "hour_rollups_s": 730 * 86400}
            assert_problem(charts.get("/v1/fleet/counts"), 403)
    finally:
        await offline(db, uid)
