"""Device queries against PostgreSQL: what each query matches, through the compiler and
through ``/v1/query``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest

from fleetline import devicequery
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess

pytestmark = [pytest.mark.integration, pytest.mark.storage]

# id suffix: (tags, desired, reported, online); twins are set directly in their tables.
FLEET: dict[str, tuple[dict[str, Any], Any, Any, bool | None]] = {
    "a1": ({"site": "A", "floor.no": 3}, {"mode": "eco"},
           {"fw": "1.1", "temp": 31.5, "net": {"rssi": -70}, "ok": True}, True),
    "a2": ({"site": "A"}, {"mode": "boost"}, {"fw": "1.10", "temp": 20}, False),
    "b1": ({"site": "B"}, None, {"fw": 1.0, "temp": "hot", "ok": False}, True),
    "b2": ({"site": "it's"}, {"mode": "eco", "fw": "1.2"}, {"fw": "1.2"}, None),
    "c1": ({}, None, None, None),
}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


@pytest.fixture
async def fleet(db: asyncpg.Pool[Any], uid: str) -> str:
    """Registers FLEET under ids ``{uid}-…`` and returns the prefix, each tagged run=uid."""
    async with db.acquire() as con, con.transaction():
        for suffix, (tags, desired, reported, online) in FLEET.items():
            device_id = f"{uid}-{suffix}"
            tagged = _json({**tags, "run": uid})
            await con.execute("INSERT INTO devices (id, tags) VALUES ($1, $2)", device_id, tagged)
            if desired is not None:
                await con.execute(
                    "INSERT INTO twin_desired (device_id, desired, version) VALUES ($1, $2, 3)",
                    device_id, _json(desired),
                )
            if reported is not None:
                await con.execute(
                    "INSERT INTO twin_reported (device_id, reported, version) VALUES ($1, $2, 5)",
                    device_id, _json(reported),
                )
            if online is not None:
                await con.execute(
                    "INSERT INTO device_activity (device_id, last_seen, online) "
                    "VALUES ($1, now(), $2)",
                    device_id, online,
                )
        # a1 is a gateway, a2 and b1 its children.
        await con.execute("UPDATE devices SET gateway = '{}' WHERE id = $1", f"{uid}-a1")
        await con.execute("UPDATE devices SET parent_id = $1 WHERE id = ANY($2::text[])",
                          f"{uid}-a1", [f"{uid}-a2", f"{uid}-b1"])
    return uid


CASES = [
    ("tags.site = 'A'", {"a1", "a2"}),
    ("tags.site != 'A'", {"b1", "b2"}),
    ("NOT tags.site = 'A'", {"b1", "b2", "c1"}),
    ("tags.site = null", {"c1"}),
    ("tags.site != null", {"a1", "a2", "b1", "b2"}),
    ("tags.site = 'it''s'", {"b2"}),
    ("tags.floor.no = 3", {"a1"}),
    ("tags.floor.no = 3.0", {"a1"}),
    ("tags.floor.no = '3'", set()),
    ("tags.site IN ('B', 'it''s')", {"b1", "b2"}),
    ("tags.site NOT IN ('B', 'it''s')", {"a1", "a2", "c1"}),
    ("id = '{uid}-a1' OR id IN ('{uid}-b1', '{uid}-zz')", {"a1", "b1"}),
    ("id >= '{uid}-b'", {"b1", "b2", "c1"}),
    ("status = 'online'", {"a1", "b1"}),
    ("status != 'online'", {"a2", "b2", "c1"}),
    ("status IN ('offline')", {"a2", "b2", "c1"}),
    ("reported.fw < '1.2'", {"a1", "a2"}),  # text compares by code point: '1.10' < '1.2'
    ("reported.fw = '1.2'", {"b2"}),
    ("reported.fw = 1", {"b1"}),  # the number 1.0
    ("reported.fw >= 1", {"b1"}),  # only numbers compare with numbers
    ("reported.temp > 25", {"a1"}),
    ("reported.temp <= 20.0", {"a2"}),
    ("reported.temp = 'hot'", {"b1"}),
    ("reported.net.rssi < -60", {"a1"}),
    ("reported.net.rssi = null", {"a2", "b1", "b2", "c1"}),
    ("reported.ok = true", {"a1"}),
    ("reported.ok = false", {"b1"}),
    ("reported.ok != true", {"b1"}),
    ("desired.mode = 'eco' AND reported.fw != desired.fw", set()),  # a1 has no desired.fw
    ("reported.fw = desired.fw", {"b2"}),
    ("reported.fw >= desired.fw", {"b2"}),
    ("reported.temp > tags.floor.no", {"a1"}),
    ("reported.temp < tags.floor.no", set()),
    ("desired.mode = 'eco' AND NOT reported.fw = '1.2'", {"a1"}),
    ("desired.mode = 'eco' OR tags.site = 'B' AND status = 'online'", {"a1", "b1", "b2"}),
    ("(desired.mode = 'eco' OR tags.site = 'B') AND status = 'online'", {"a1", "b1"}),
    ("NOT (desired.mode = 'eco' OR reported.temp > 10)", {"b1", "c1"}),
    ("desired.\"mode\" in ('boost')", {"a2"}),
    ("parent = '{uid}-a1'", {"a2", "b1"}),
    ("parent = null", {"a1", "b2", "c1"}),
    ("parent != null", {"a2", "b1"}),
    ("parent != '{uid}-a1'", set()),  # as a missing property: no parent matches nothing
    ("NOT parent = '{uid}-a1'", {"a1", "b2", "c1"}),
    ("parent IN ('{uid}-a1', '{uid}-zz') AND status = 'online'", {"b1"}),
    ("parent NOT IN ('{uid}-a1')", {"a1", "b2", "c1"}),
    ("gateway = true", {"a1"}),
    ("gateway != true", {"a2", "b1", "b2", "c1"}),
    ("gateway IN (false)", {"a2", "b1", "b2", "c1"}),
    ("gateway = true OR parent = '{uid}-a1'", {"a1", "a2", "b1"}),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
async def test_what_a_query_matches(
    db: asyncpg.Pool[Any], fleet: str, text: str, expected: set[str]
) -> None:
    query = devicequery.compile_query(text.replace("{uid}", fleet), first_param=2)
    rows = await db.fetch(
        f"SELECT d.id FROM {devicequery.DEVICE_FROM} WHERE d.tags @> $1 AND ({query.where})",
        _json({"run": fleet}),
        *query.params,
    )
    assert {r["id"].removeprefix(f"{fleet}-") for r in rows} == expected, query


async def test_the_rest_endpoint_pages_through_matches(
    api: ApiProcess, make_key: Callable[..., Any], fleet: str
) -> None:
    c = client(api, await make_key("devices:read"))
    query = f"tags.run = '{fleet}' AND tags.site != 'B'"
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(5):
        resp = c.post("/v1/query", json={"query": query, "limit": 2, "cursor": cursor})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [d["device_id"] for d in seen] == [f"{fleet}-a1", f"{fleet}-a2", f"{fleet}-b2"]
    a1 = seen[0]
    assert a1["online"] is True and a1["last_seen"] is not None
    assert a1["desired"] == {"mode": "eco"} and a1["desired_version"] == 3
    assert a1["reported"]["net"] == {"rssi": -70} and a1["reported_version"] == 5
    assert a1["tags"] == {"site": "A", "floor.no": 3, "run": fleet}

    got = c.get("/v1/query", params={"q": f"tags.run = '{fleet}' AND status = 'online'"})
    assert got.status_code == 200, got.text
    assert [d["device_id"] for d in got.json()["items"]] == [f"{fleet}-a1", f"{fleet}-b1"]
    empty = c.get("/v1/query", params={"q": f"tags.run = '{fleet}-none'"}).json()
    assert empty == {"items": [], "next_cursor": None}


async def test_a_bad_query_is_a_400_with_its_position(
    api: ApiProcess, make_key: Callable[..., Any]
) -> None:
    c = client(api, await make_key("devices:read"))
    body = assert_problem(
        c.post("/v1/query", json={"query": "tags.site = 'A' AND reported.fw <"}), 400,
        "expected a value",
    )
    assert body["position"] == 33
    body = assert_problem(c.get("/v1/query", params={"q": "colour = 'red'"}), 400,
                          "unknown property 'colour'")
    assert body["position"] == 0
    assert_problem(c.post("/v1/query", json={"query": "x" * 5000}), 422)
    assert_problem(c.post("/v1/query", json={"query": "", "limit": 0}), 422)
    assert_problem(client(api, await make_key("telemetry:read")).get("/v1/query"), 403)
