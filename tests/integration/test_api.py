"""The REST API against the real database, with telemetry written by the real ingest."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from statistics import mean
from typing import Any

import asyncpg
import httpx
import pytest

from fleetline import apikeys
from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import wait_rows
from tests.support import ApiProcess, Device, IngestProcess, settle_rollups

pytestmark = [pytest.mark.integration, pytest.mark.storage]
PROBLEM = "application/problem+json"


def client(api: ApiProcess, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=api.url, headers=headers, timeout=10)


def assert_problem(resp: httpx.Response, status: int, detail: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["title"] and body["instance"]
    assert detail in body.get("detail", ""), body
    return body


async def test_requests_without_a_valid_key_get_401(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any]
) -> None:
    resp = client(api).get("/v1/devices")
    assert_problem(resp, 401, "an API key is required")
    assert resp.headers["www-authenticate"] == "Bearer"
    assert_problem(client(api, "flk_nope").get("/v1/devices"), 401, "unknown or revoked")
    token = await make_key("devices:read")
    assert client(api, token).get("/v1/devices").status_code == 200
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert_problem(client(api, wrong_secret).get("/v1/devices"), 401)
    key_id = apikeys.split_token(token)[0]  # type: ignore[index]
    async with db.acquire() as con:
        assert await apikeys.revoke(con, key_id)
    assert_problem(client(api, token).get("/v1/devices"), 401, "unknown or revoked")


async def test_a_key_without_the_scope_gets_403(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    reader = client(api, await make_key("devices:read"))
    assert_problem(reader.post("/v1/devices", json={"id": f"{uid}-x"}), 403, "devices:write")
    assert_problem(reader.get(f"/v1/devices/{uid}-x/latest"), 403, "telemetry:read")
    admin = client(api, await make_key("admin"))
    assert admin.post("/v1/devices", json={"id": f"{uid}-x"}).status_code == 201


async def test_device_registry_lifecycle(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    c = client(api, await make_key("devices:read", "devices:write"))
    created = c.post("/v1/devices", json={"id": f"{uid}-a", "tags": {"site": uid, "floor": 2}})
    assert created.status_code == 201
    assert created.json()["tags"] == {"site": uid, "floor": 2}
    assert created.json()["online"] is False and created.json()["last_seen"] is None
    assert_problem(c.post("/v1/devices", json={"id": f"{uid}-a"}), 409, "exists")
    for i in range(5):
        assert c.post("/v1/devices", json={"id": f"{uid}-b{i}", "tags": {"site": uid}}).is_success
    patched = c.patch(f"/v1/devices/{uid}-a", json={"tags": {"floor": None, "zone": "z"}})
    assert patched.json()["tags"] == {"site": uid, "zone": "z"}
    # Paging through the tag filter: 6 devices, 4 a page.
    first = c.get("/v1/devices", params={"tag": f"site={uid}", "limit": 4}).json()
    assert len(first["items"]) == 4 and first["next_cursor"]
    second = c.get("/v1/devices", params={"tag": f"site={uid}", "limit": 4,
                                         "cursor": first["next_cursor"]}).json()
    ids = [d["id"] for d in first["items"] + second["items"]]
    assert ids == sorted(ids) and len(set(ids)) == 6 and second["next_cursor"] is None
    both = c.get("/v1/devices", params={"tag": [f"site={uid}", "zone=z"]}).json()
    assert [d["id"] for d in both["items"]] == [f"{uid}-a"]
    online = c.get("/v1/devices", params={"tag": f"site={uid}", "status": "online"}).json()
    assert online["items"] == []
    assert c.delete(f"/v1/devices/{uid}-a").status_code == 204
    assert_problem(c.get(f"/v1/devices/{uid}-a"), 404, "not found")
    assert_problem(c.delete(f"/v1/devices/{uid}-a"), 404)


async def test_invalid_input_is_a_4xx_problem(
    api: ApiProcess, make_key: Callable[..., Any]
) -> None:
    c = client(api, await make_key("admin"))
    body = assert_problem(c.post("/v1/devices", json={"id": "bad id!"}), 422, "body.id")
    for segment in (".", ".."):  # path segments: they would name another folder
        assert_problem(c.post("/v1/devices", json={"id": segment}), 422, "body.id")
    assert body["errors"][0]["loc"] == ["body", "id"]
    assert_problem(c.post("/v1/devices", json={"id": "ok", "color": "red"}), 422, "color")
    assert_problem(c.post("/v1/devices", content=b"{", headers={"content-type":
                                                                 "application/json"}), 422)
    assert_problem(c.get("/v1/devices", params={"tag": "nosign"}), 422, "query.tag")
    assert_problem(c.get("/v1/devices", params={"limit": 0}), 422, "limit")
    assert_problem(c.get("/v1/devices/bad%20id"), 422)
    assert_problem(c.get("/v1/nothing"), 404)


async def test_telemetry_written_by_ingest_reads_back_raw_bucketed_and_latest(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-t"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    base = (datetime.now(UTC) - timedelta(hours=4)).replace(minute=0, second=0, microsecond=0)
    points = [(base + timedelta(minutes=7 * i), float(i * i % 17)) for i in range(30)]
    dev = Device(broker.url, device_id)
    dev.publish_all([{"ts": ts.isoformat(), "values": {"temp": v, "fw": f"1.{i}"}}
                     for i, (ts, v) in enumerate(points)])
    assert await wait_rows(db, device_id, 60) == 60
    c = client(api, await make_key("telemetry:read"))

    latest = c.get(f"/v1/devices/{device_id}/latest").json()
    assert latest["metrics"]["temp"]["value"] == points[-1][1]
    assert latest["metrics"]["fw"]["value_text"] == "1.29"

    # Raw points, paged by 7, in time order.
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"metric": "temp", "from": base.isoformat(), "limit": 7}
    while True:
        page = c.get(f"/v1/devices/{device_id}/telemetry", params=params).json()
        seen += page["items"]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert [p["value"] for p in seen] == [v for _, v in points]

    # Hourly buckets equal what the raw points give.
    agg = c.get(f"/v1/devices/{device_id}/telemetry",
                params={"metric": "temp", "from": base.isoformat(), "bucket": "PT1H"}).json()
    assert agg["bucket_seconds"] == 3600
    for bucket in agg["items"]:
        start = datetime.fromisoformat(bucket["bucket"])
        inside = [v for ts, v in points if start <= ts < start + timedelta(hours=1)]
        assert bucket["count"] == len(inside) and bucket["last"] == inside[-1]
        assert bucket["min"] == min(inside) and bucket["max"] == max(inside)
        assert bucket["avg"] == pytest.approx(mean(inside))
    assert sum(b["count"] for b in agg["items"]) == len(points)
    only = c.get(f"/v1/devices/{device_id}/telemetry",
                 params={"from": base.isoformat(), "bucket": 3600, "agg": ["max"]})
    assert only.status_code == 200, only.text
    first = next(b for b in only.json()["items"] if b["metric"] == "temp")
    assert first["max"] is not None and first["avg"] is None and first["count"] is None
    dev.close()


async def test_bad_telemetry_queries_are_400_or_404(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    await db.execute("INSERT INTO devices (id) VALUES ($1)", f"{uid}-q")
    c = client(api, await make_key("telemetry:read"))
    url = f"/v1/devices/{uid}-q/telemetry"
    assert_problem(c.get(url, params={"from": "2026-11-25T10:00Z", "to": "2026-11-25T09:00Z"}),
                   400, "'from' must be before 'to'")
    assert_problem(c.get(url, params={"from": "2026-11-25T10:00"}), 422, "query.from")
    assert_problem(c.get(url, params={"to": "0.5"}), 422, "query.to")
    assert_problem(c.get(url, params={"from": "2026-13-25T10:00Z"}), 400, "not a valid time")
    assert_problem(c.get(url, params={"from": "2020-01-01T00:00Z", "bucket": 1}), 400,
                   "at most 10,000")
    assert_problem(c.get(url, params={"bucket": 0.5}), 400, "at least 1 second")
    assert_problem(c.get(url, params={"bucket": "soon"}), 400, "'bucket' 'soon' is not")
    assert c.get(url, params={"bucket": "5m"}).json()["items"] == []
    assert_problem(c.get(url, params={"cursor": "zzz"}), 400, "cursor")
    assert_problem(c.get(url, params={"metric": "bad name"}), 422)
    assert_problem(c.get(url, params={"agg": "median", "bucket": 60}), 422)
    assert_problem(c.get(f"/v1/devices/{uid}-none/latest"), 404)
    assert c.get(url).json() == {"items": [], "next_cursor": None}


async def test_edge_inputs_are_4xx_problems(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    c = client(api, await make_key("admin"))
    device = f"{uid}-e"
    assert c.post("/v1/devices", json={"id": device}).status_code == 201
    url = f"/v1/devices/{device}/telemetry"
    # A time beyond what any reading can have, and widths with no fixed length.
    assert_problem(c.get(url, params={"to": "0001-01-01T00:00Z"}), 400, "must lie between")
    assert_problem(c.get(url, params={"from": "9999-12-31T23:59+05:00"}), 400)
    assert_problem(c.get(url, params={"bucket": "P1M"}), 400, "years or months")
    assert_problem(c.get(url, params={"bucket": "P999999999D"}), 400, "at most 366 days")
    assert_problem(c.get(url, params={"bucket": "1e308s"}), 400)
    # Tags: no NaN, no more than 64 after a merge.
    nan = c.post("/v1/devices", content=b'{"id": "nan-1", "tags": {"a": NaN}}',
                 headers={"content-type": "application/json"})
    assert_problem(nan, 422)
    for chunk in range(2):
        tags = {f"t{chunk}_{i}": i for i in range(40)}
        resp = c.patch(f"/v1/devices/{device}", json={"tags": tags})
    assert_problem(resp, 400, "at most 64 tags")
    assert_problem(c.patch(f"/v1/devices/{uid}-none", json={"tags": {"a": 1}}), 404)
    # A path with several methods names them all when the method is wrong.
    wrong = c.put(f"/v1/devices/{device}")
    assert_problem(wrong, 405)
    allowed = set(wrong.headers["allow"].split(", "))
    assert {"GET", "PATCH", "DELETE"} <= allowed and not {"PUT", "POST"} & allowed
    assert "POST" in c.put("/v1/devices").headers["allow"]
    # A deleted device is gone from the telemetry routes too (its readings stay stored).
    assert c.post("/v1/devices", json={"id": f"{uid}-gone"}).status_code == 201
    assert c.delete(f"/v1/devices/{uid}-gone").status_code == 204
    assert_problem(c.get(f"/v1/devices/{uid}-gone/telemetry"), 404)
    assert_problem(c.get(f"/v1/devices/{uid}-gone/latest"), 404)
    # One tag asked for two values matches nothing.
    assert c.get("/v1/devices", params={"tag": ["a=1", "a=2"]}).json()["items"] == []


async def test_paging_all_metrics_and_counting_text_values(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-p"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    base = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    dev = Device(broker.url, device_id)
    # Three metrics share every timestamp: pages must break ties without loss or repeats.
    dev.publish_all([{"ts": (base + timedelta(seconds=i)).isoformat(),
                      "values": {"a": i, "b": -i, "note": f"n{i}"}} for i in range(20)])
    assert await wait_rows(db, device_id, 60) == 60
    c = client(api, await make_key("telemetry:read"))
    seen: list[tuple[str, str]] = []
    params: dict[str, Any] = {"from": base.isoformat(), "limit": 7}
    while True:
        page = c.get(f"/v1/devices/{device_id}/telemetry", params=params).json()
        seen += [(p["ts"], p["metric"]) for p in page["items"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert len(seen) == 60 and len(set(seen)) == 60 and seen == sorted(seen, key=lambda p: p[0])
    agg = c.get(f"/v1/devices/{device_id}/telemetry",
                params={"from": base.isoformat(), "bucket": "1h", "agg": "count,max"}).json()
    by_metric = {b["metric"]: b for b in agg["items"]}
    assert by_metric["note"]["count"] == 20 and by_metric["note"]["max"] is None
    assert by_metric["a"]["count"] == 20 and by_metric["a"]["max"] == 19
    assert by_metric["a"]["avg"] is None  # not asked for
    dev.close()


async def test_aligned_buckets_come_from_rollups_and_equal_raw(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    device_id = f"{uid}-r"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    sid = await db.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ($1, 'temp') RETURNING id", device_id)
    base = (datetime.now(UTC) - timedelta(hours=6)).replace(minute=0, second=0, microsecond=0)
    rows = [(sid, base + timedelta(seconds=50 * i), float((i * 7) % 23)) for i in range(400)]
    await db.executemany("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, $3)",
                         rows)
    # Hours old: on TimescaleDB, into minutes a refresh may already have materialized.
    await settle_rollups(db)
    c = client(api, await make_key("telemetry:read"))
    url = f"/v1/devices/{device_id}/telemetry"
    end = base + timedelta(hours=6)

    def query(bucket: str, start: datetime) -> dict[str, Any]:
        body: dict[str, Any] = c.get(url, params={
            "bucket": bucket, "from": start.isoformat(), "to": end.isoformat()}).json()
        return body

    # Older than the minute rollups are kept (90 days): raw rows, even when aligned.
    old = (end - timedelta(days=100)).replace(minute=0)
    assert query("30m", old)["source"] == "telemetry"
    # Unaligned: raw rows. Aligned to the minute or the hour: the rollups.
    raw = query("1h", base + timedelta(seconds=1))
    assert raw["source"] == "telemetry"
    hourly = query("1h", base)  # rolled up as the readings were written
    assert hourly["source"] == "telemetry_1h"
    per_10m = query("10m", base)
    assert per_10m["source"] == "telemetry_1m"
    for answer, width in ((hourly, 3600), (per_10m, 600)):
        assert sum(b["count"] for b in answer["items"]) == len(rows)
        for b in answer["items"]:
            start = datetime.fromisoformat(b["bucket"])
            inside = [v for _s, ts, v in rows if start <= ts < start + timedelta(seconds=width)]
            assert b["count"] == len(inside) and b["last"] == inside[-1]
            assert (b["min"], b["max"]) == (min(inside), max(inside))
            assert b["avg"] == pytest.approx(mean(inside))


async def test_fleet_latest_lists_one_metric_across_devices(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    admin = client(api, await make_key("admin"))
    now = datetime.now(UTC)
    for i in range(5):
        device_id = f"{uid}-f{i}"
        assert admin.post("/v1/devices", json={"id": device_id, "tags": {"site": uid}}).is_success
        dev = Device(broker.url, device_id)
        # Out of order: the newest reading arrives first and must stay the latest.
        dev.publish_all([
            {"ts": (now - timedelta(seconds=10)).isoformat(), "values": {"temp": 100 + i}},
            {"ts": (now - timedelta(seconds=20)).isoformat(), "values": {"temp": 0}},
        ])
        dev.close()
    assert await wait_rows(db, f"{uid}-f", 10) == 10
    c = client(api, await make_key("telemetry:read"))
    first = c.get("/v1/latest", params={"metric": "temp", "tag": f"site={uid}", "limit": 3}).json()
    rest = c.get("/v1/latest", params={"metric": "temp", "tag": f"site={uid}", "limit": 3,
                                       "cursor": first["next_cursor"]}).json()
    values = {p["device_id"]: p["value"] for p in first["items"] + rest["items"]}
    assert values == {f"{uid}-f{i}": 100.0 + i for i in range(5)}
    assert rest["next_cursor"] is None
    assert c.get("/v1/latest", params={"metric": "nope", "tag": f"site={uid}"}).json()[
        "items"] == []
    assert_problem(c.get("/v1/latest"), 422, "query.metric")
