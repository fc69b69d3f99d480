"""Jobs (/v1/jobs): the API as a process running methods and twin patches on real paho
devices over the real broker; restarts, cancellation and two replicas sharing a job."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest

from fleetline import apikeys
from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import migrated_database
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess, Device, wait_until

pytestmark = pytest.mark.integration

# (request body) -> (status, payload) to answer with, the raw answer, or None to stay
# silent.
Answer = Callable[[dict[str, Any]], tuple[int, Any] | bytes | None]


class JobDevice:
    """A device on the real broker, as firmware would be: it answers method requests
    from paho's network thread (after ``delay`` seconds, from a timer thread) and keeps
    the desired documents it receives on ``devices/{id}/twin/desired``."""

    def __init__(
        self, broker_url: str, device_id: str, answer: Answer | None = None, *, delay: float = 0
    ) -> None:
        self.device_id = device_id
        self.answer = answer or self.echo
        self.requests: list[dict[str, Any]] = []
        self.desired: list[tuple[dict[str, Any], bool]] = []  # (document, retained)
        self._lock = threading.Lock()
        self.device = Device(broker_url, device_id)
        c = self.device.client
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            if not msg.payload:  # a retained document cleared (the device was deleted)
                return
            body = orjson.loads(msg.payload)
            if msg.topic.endswith("/twin/desired"):
                with self._lock:
                    self.desired.append((body, bool(msg.retain)))
                return
            request_id = msg.topic.split("/")[3]
            with self._lock:
                self.requests.append(body)
            reply = self.answer(body)
            if reply is None:
                return
            topic = f"devices/{device_id}/methods/{request_id}/res"
            if isinstance(reply, bytes):
                raw = reply
            else:
                status, payload = reply
                raw = orjson.dumps({"status": status, "payload": payload})
            if delay:
                threading.Timer(delay, c.publish, (topic, raw), {"qos": 1}).start()
            else:
                c.publish(topic, raw, qos=1)

        c.on_message = on_message
        c.subscribe(
            [(f"devices/{device_id}/methods/+/req", 1), (f"devices/{device_id}/twin/desired", 1)]
        )
        assert subscribed.wait(10), "the device's subscription was not acknowledged"

    def echo(self, body: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"device": self.device_id, "method": body["method"], **body["params"]}

    def calls(self, method: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == method]

    def documents(self) -> list[tuple[dict[str, Any], bool]]:
        with self._lock:
            return list(self.desired)

    def close(self) -> None:
        self.device.close()


@pytest.fixture
def job_devices(broker: LocalMosquitto) -> Iterator[Callable[..., JobDevice]]:
    made: list[JobDevice] = []

    def make(device_id: str, answer: Answer | None = None, **kwargs: Any) -> JobDevice:
        made.append(JobDevice(broker.url, device_id, answer, **kwargs))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


async def register(
    pool: asyncpg.Pool[Any], ids: list[str], tags: dict[str, Any], *, online: bool = False
) -> list[str]:
    """Register devices with tags; ``online``: mark them online as ingest does on their
    `online` status."""
    await pool.execute(
        "INSERT INTO devices (id, tags) SELECT unnest($1::text[]), $2::text::jsonb",
        ids,
        orjson.dumps(tags).decode(),
    )
    if online:
        await pool.execute(
            "INSERT INTO device_activity (device_id, last_seen, online, status_changed_at) "
            "SELECT unnest($1::text[]), now(), true, now()",
            ids,
        )
    return ids


async def offline(pool: asyncpg.Pool[Any], prefix: str) -> None:
    """No later test (schemathesis follows device lists) may find these devices online."""
    await pool.execute(
        "UPDATE device_activity SET online = false WHERE device_id LIKE $1 || '%'", prefix
    )


async def cancel_leftover_jobs(pool: asyncpg.Pool[Any]) -> None:
    """Jobs other tests (schemathesis) left running would share the runner with ours."""
    await pool.execute(
        "UPDATE jobs SET state = 'cancelled', cancelled_at = now() "
        "WHERE state IN ('queued', 'running')"
    )
    await pool.execute(
        "UPDATE job_devices SET state = 'cancelled', reason = 'cancelled', finished_at = now() "
        "WHERE state = 'pending'"
    )


@pytest.fixture(autouse=True)
async def _only_our_jobs(db: asyncpg.Pool[Any]) -> None:
    await cancel_leftover_jobs(db)


def method_job(query: str, name: str, **extra: Any) -> dict[str, Any]:
    params = extra.pop("params", {})
    timeout_s = extra.pop("timeout_s", 5)
    return {
        "query": query,
        "type": "method",
        "method": {"name": name, "params": params, "timeout_s": timeout_s},
        **extra,
    }


def wait_job(
    c: httpx.Client,
    job_id: int,
    *,
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """The job once ``until`` holds (default: it has finished)."""
    done = until or (lambda job: job["finished_at"] is not None)

    def check() -> dict[str, Any] | None:
        resp = c.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job if done(job) else None

    found: dict[str, Any] = wait_until(check, timeout=timeout, interval=0.1, what=f"job {job_id}")
    return found


def outcomes(c: httpx.Client, job_id: int, **params: Any) -> list[dict[str, Any]]:
    """Every device of the job, following the pages."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = c.get(f"/v1/jobs/{job_id}/devices", params=query)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_a_method_job_calls_every_matched_device_and_records_each_outcome(
    api: ApiProcess,
    make_key: Callable[..., Any],
    job_devices: Callable[..., JobDevice],
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    answering = await register(db, [f"{uid}-{i}" for i in range(3)], {"run": uid}, online=True)
    [broken] = await register(db, [f"{uid}-broken"], {"run": uid}, online=True)
    [away] = await register(db, [f"{uid}-away"], {"run": uid})  # never connected
    [other] = await register(db, [f"{uid}-other"], {"run": f"{uid}-not"}, online=True)
    try:
        devs = {d: job_devices(d) for d in answering}
        devs[broken] = job_devices(broken, lambda _b: (500, {"error": "relay stuck"}))
        devs[other] = job_devices(other)
        c = client(api, await make_key("commands:write"))
        params = {"level": 3, "note": "ünïcode", "big": 2**70}
        created = c.post(
            "/v1/jobs", json=method_job(f"tags.run = '{uid}'", "set", params=params, batch_size=2)
        )
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["type"] == "method" and job["query"] == f"tags.run = '{uid}'"
        assert job["method"] == {"name": "set", "params": params, "timeout_s": 5}
        assert job["batch_size"] == 2 and job["max_per_second"] is None
        assert job["progress"]["total"] == 5 and job["created_by"]

        done = wait_job(c, job["id"])
        assert done["state"] == "completed"
        assert done["started_at"] and done["finished_at"] >= done["started_at"]
        assert done["progress"] == {
            "total": 5,
            "pending": 0,
            "running": 0,
            "succeeded": 3,
            "failed": 2,
            "rolled_back": 0,
            "cancelled": 0,
            "percent": 100.0,
        }
        rows = {r["device_id"]: r for r in outcomes(c, job["id"], limit=2)}
        assert sorted(rows) == sorted([*answering, broken, away])
        for device_id in answering:
            row = rows[device_id]
            assert (row["state"], row["status"], row["reason"], row["attempts"]) == (
                "succeeded",
                200,
                "answered",
                1,
            )
            # The integer beyond 64 bits reaches the device exactly, as a direct call does.
            assert devs[device_id].calls("set") == [{"method": "set", "params": params}]
            assert row["result"]["payload"]["device"] == device_id
            assert row["result"]["payload"]["note"] == "ünïcode"
            assert len(row["result"]["request_id"]) == 32
            assert row["error"] is None and row["started_at"] and row["finished_at"]
        # A device that answers with an error code did not do it: failed, its answer kept.
        assert rows[broken]["state"] == "failed" and rows[broken]["status"] == 500
        assert rows[broken]["result"]["payload"] == {"error": "relay stuck"}
        assert "status 500" in rows[broken]["error"]
        assert (rows[away]["state"], rows[away]["status"], rows[away]["reason"]) == (
            "failed",
            409,
            "offline",
        )
        assert f"device {away} is offline" in rows[away]["error"]
        assert devs[other].requests == []  # not matched by the query

        failed = outcomes(c, job["id"], state="failed")
        assert sorted(r["device_id"] for r in failed) == sorted([broken, away])

        # Listing: newest first, filtered by state, paged; readable with devices:read.
        reader = client(api, await make_key("devices:read"))
        second = c.post("/v1/jobs", json=method_job(f"id = '{uid}-nobody'", "noop")).json()
        listed = reader.get("/v1/jobs", params={"limit": 1}).json()
        assert [j["id"] for j in listed["items"]] == [second["id"]] and listed["next_cursor"]
        after = reader.get("/v1/jobs", params={"limit": 1, "cursor": listed["next_cursor"]})
        assert after.json()["items"][0]["id"] == job["id"]
        completed = reader.get("/v1/jobs", params={"state": "completed"}).json()["items"]
        assert job["id"] in [j["id"] for j in completed]
        assert all(j["state"] == "completed" for j in completed)
        assert reader.get(f"/v1/jobs/{job['id']}").json()["progress"]["succeeded"] == 3
        assert_problem(reader.post("/v1/jobs", json=method_job("", "x")), 403, "commands:write")
        assert_problem(reader.post(f"/v1/jobs/{job['id']}/cancel"), 403, "commands:write")
    finally:
        await offline(db, uid)


async def test_a_job_matching_nothing_is_completed_at_once(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    c = client(api, await make_key("commands:write"))
    created = c.post("/v1/jobs", json=method_job(f"id = '{uid}-nobody'", "noop"))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] == "completed" and job["finished_at"]
    assert job["progress"]["total"] == 0 and job["progress"]["percent"] == 100.0
    assert c.get(f"/v1/jobs/{job['id']}/devices").json() == {"items": [], "next_cursor": None}
    assert_problem(c.post(f"/v1/jobs/{job['id']}/cancel"), 409, "completed already")


async def test_invalid_jobs_get_4xx_problems(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    c = client(api, await make_key("commands:write", "devices:write"))
    bad = c.post("/v1/jobs", json=method_job("tags.run = 'x' AND AND", "m"))
    body = assert_problem(bad, 400, "expected a property")
    assert body["position"] == 19
    assert (
        assert_problem(c.post("/v1/jobs", json=method_job("status = 'maybe'", "m")), 400)[
            "position"
        ]
        == 9
    )
    good = method_job(f"id = '{uid}'", "m")
    for wrong in (
        {k: v for k, v in good.items() if k != "query"},
        {**good, "type": "reboot"},
        {k: v for k, v in good.items() if k != "method"},
        {**good, "patch": {"a": 1}},
        {**good, "batch_size": 0},
        {**good, "batch_size": 1001},
        {**good, "max_per_second": 0},
        {**good, "max_per_second": -1},
        {**good, "method": {"name": "m", "timeout_s": 301}},
        {**good, "method": {"name": "bad name"}},
        {**good, "method": {"name": "m", "params": []}},
        {**good, "extra": 1},
        {"query": "", "type": "twin"},
        {"query": "", "type": "twin", "patch": []},
        {"query": "x" * 5000, "type": "twin", "patch": {}},
    ):
        assert_problem(c.post("/v1/jobs", json=wrong), 422)
    for raw in (
        b'{"query": "", "type": "twin", "patch": {"a": NaN}}',
        b'{"query": "", "type": "method", "method": {"name": "m", "params": {"x": Infinity}}}',
    ):
        assert_problem(
            c.post("/v1/jobs", content=raw, headers={"content-type": "application/json"}), 422
        )
    # A NUL character: the direct method route refuses it too (jsonb could not keep it).
    nul = method_job(f"id = '{uid}'", "m", params={"a": {"b": "x\u0000"}})
    assert_problem(c.post("/v1/jobs", json=nul), 400, "params.a.b contains a NUL character")
    twin = {"query": f"id = '{uid}'", "type": "twin"}
    assert_problem(c.post("/v1/jobs", json={**twin, "patch": {"a.b": 1}}), 400, "member name")
    deep: dict[str, Any] = {"v": 1}
    for _ in range(8):
        deep = {"a": deep}
    assert_problem(c.post("/v1/jobs", json={**twin, "patch": deep}), 400, "nested more than")
    assert_problem(
        c.post("/v1/jobs", json={**twin, "patch": {"blob": "x" * 40_000}}), 413, "more than 32768"
    )
    # A twin job changes desired properties: it needs devices:write besides commands:write.
    commander = client(api, await make_key("commands:write"))
    assert_problem(
        commander.post("/v1/jobs", json={**twin, "patch": {"a": 1}}), 403, "devices:write"
    )
    assert c.post("/v1/jobs", json={**twin, "patch": {"a": 1}}).status_code == 201
    for path in ("/v1/jobs/999999999", "/v1/jobs/999999999/devices"):
        assert_problem(c.get(path), 404, "job 999999999 not found")
    assert_problem(c.post("/v1/jobs/999999999/cancel"), 404)
    assert_problem(c.get("/v1/jobs", params={"state": "sleeping"}), 422)
    assert_problem(c.get("/v1/jobs/1/devices", params={"state": "sleeping"}), 422)
    assert_problem(client(api).get("/v1/jobs"), 401)


async def test_answers_jsonb_cannot_hold_fail_as_malformed_and_are_sent_once(
    api: ApiProcess,
    make_key: Callable[..., Any],
    job_devices: Callable[..., JobDevice],
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    """A NUL character or a number beyond a double in the answer (jsonb refuses both)
    was once taken for a database outage: the device was called again (3 times), then
    abandoned."""
    answers = {
        f"{uid}-nul": b'{"status": 200, "payload": {"text": "a\\u0000b"}}',
        f"{uid}-nul-name": b'{"status": 200, "payload": {"a\\u0000": 1}}',
        f"{uid}-huge": b'{"status": 200, "payload": {"x": [1, 1e400]}}',
    }
    ids = await register(db, [*answers, f"{uid}-fine"], {"run": uid}, online=True)
    try:

        def answer(device_id: str) -> Answer:
            raw = answers.get(device_id)
            return lambda _body: raw if raw is not None else (200, "ok")

        devs = {d: job_devices(d, answer(d)) for d in ids}
        c = client(api, await make_key("commands:write"))
        job = c.post("/v1/jobs", json=method_job(f"tags.run = '{uid}'", "read")).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "completed", done
        assert (done["progress"]["succeeded"], done["progress"]["failed"]) == (1, 3), done
        for row in outcomes(c, job["id"]):
            assert len(devs[row["device_id"]].calls("read")) == 1, row
            assert row["attempts"] == 1, row
            if row["device_id"] in answers:
                assert (row["state"], row["status"], row["reason"]) == ("failed", 502, "malformed")
                assert "malformed response" in row["error"] and row["result"] is None, row
            else:
                assert row["state"] == "succeeded" and row["result"]["payload"] == "ok", row
    finally:
        await offline(db, uid)


async def test_an_outcome_the_database_refuses_is_kept_without_its_result(
    api: ApiProcess,
    make_key: Callable[..., Any],
    job_devices: Callable[..., JobDevice],
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    """A value PostgreSQL refuses (data exception, class 22) is no outage: retrying it
    changes nothing, and leaving the device running would start it again."""
    [device_id] = await register(db, [f"{uid}-d"], {"run": uid}, online=True)
    fn, trigger = f'"{uid}-refuse"', f'"{uid}-refuse-trigger"'
    # As PostgreSQL refuses a result it cannot store (22P05: \u0000 in jsonb).
    await db.execute(f"""
        CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.device_id = '{device_id}' AND NEW.result IS NOT NULL THEN
                RAISE EXCEPTION 'unsupported Unicode escape sequence'
                    USING ERRCODE = '22P05';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {trigger} BEFORE UPDATE ON job_devices
            FOR EACH ROW EXECUTE FUNCTION {fn}();
    """)
    try:
        dev = job_devices(device_id)
        c = client(api, await make_key("commands:write"))
        job = c.post("/v1/jobs", json=method_job(f"id = '{device_id}'", "read")).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "completed" and done["progress"]["succeeded"] == 1, done
        [row] = outcomes(c, job["id"])
        assert (row["state"], row["status"], row["reason"], row["attempts"]) == (
            "succeeded",
            200,
            "answered",
            1,
        )
        assert row["result"] is None
        assert "the database refused to store the result (22P05)" in row["error"]
        assert len(dev.calls("read")) == 1
    finally:
        await db.execute(f"DROP TRIGGER {trigger} ON job_devices; DROP FUNCTION {fn}()")
        await offline(db, uid)


async def test_cancel_stops_the_pending_devices_and_lets_running_ones_finish(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    # Offline devices fail at once (409); one start every 2 s keeps the job going.
    ids = await register(db, [f"{uid}-{i:02}" for i in range(10)], {"run": uid})
    c = client(api, await make_key("commands:write", "devices:read"))
    job = c.post(
        "/v1/jobs",
        json=method_job(f"tags.run = '{uid}'", "m", batch_size=1, max_per_second=0.5),
    ).json()
    wait_job(c, job["id"], until=lambda j: j["progress"]["failed"] >= 1)
    cancelled = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["cancelled_at"]
    assert cancelled.json()["cancelled_by"]
    assert_problem(c.post(f"/v1/jobs/{job['id']}/cancel"), 409, "cancelled already")
    done = wait_job(c, job["id"])
    progress = done["progress"]
    assert done["state"] == "cancelled"
    assert progress["pending"] == 0 and progress["running"] == 0 and progress["total"] == 10
    assert progress["failed"] >= 1 and progress["cancelled"] >= 5
    assert progress["failed"] + progress["cancelled"] == 10 and progress["percent"] == 100.0
    rows = outcomes(c, job["id"])
    assert sorted(r["device_id"] for r in rows) == ids
    for row in rows:
        if row["state"] == "cancelled":
            assert row["reason"] == "cancelled" and row["attempts"] == 0
        else:
            assert (row["state"], row["reason"], row["attempts"]) == ("failed", "offline", 1)
    assert await db.fetchval("SELECT count(*) FROM job_devices WHERE job_id = $1", job["id"]) == 10


# --- processes of our own: a database only they serve ------------------------------


@pytest.fixture(scope="module")
async def private_db(admin_url: str) -> AsyncIterator[str]:
    """A database of its own: the session's API process would otherwise run these
    tests' jobs too, where each test needs to know which processes run them."""
    async with migrated_database(admin_url, "fleetline_jobs") as url:
        yield url


@pytest.fixture
async def private(private_db: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await asyncpg.create_pool(private_db, min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
def start_private_api(
    private_db: str, broker: LocalMosquitto, artifacts: Path, uid: str
) -> Iterator[Callable[..., ApiProcess]]:
    started: list[ApiProcess] = []

    def start(name: str, **env: str) -> ApiProcess:
        proc = ApiProcess(
            database_url=private_db,
            mqtt_url=broker.url,
            log_dir=artifacts,
            name=f"{uid}-{name}",
            env={"FLEETLINE_API_JOBS_POLL_INTERVAL_SECONDS": "0.2", **env},
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


async def admin_token(pool: asyncpg.Pool[Any]) -> str:
    async with pool.acquire() as con:
        return (await apikeys.create_key(con, name="jobs test", scopes=["admin"])).token


async def stored_job(
    pool: asyncpg.Pool[Any], method: dict[str, Any], devices: list[str],
    *, max_per_second: float | None = None,
) -> int:
    """A method job written as POST /v1/jobs writes it, one device at a time: the job and
    its devices in one transaction (a runner's sweep seeing the job without its devices
    finishes it at once)."""
    async with pool.acquire() as con, con.transaction():
        job_id: int = await con.fetchval(
            "INSERT INTO jobs (type, query, spec, batch_size, max_per_second, total) "
            "VALUES ('method', $1, $2::jsonb, 1, $3, $4) RETURNING id",
            "id IN (" + ", ".join(f"'{d}'" for d in devices) + ")",
            orjson.dumps(method).decode(), max_per_second, len(devices))
        await con.executemany("INSERT INTO job_devices (job_id, device_id) VALUES ($1, $2)",
                              [(job_id, d) for d in devices])
    return job_id


async def states(pool: asyncpg.Pool[Any], job_id: int) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*)::int AS n FROM job_devices WHERE job_id = $1 GROUP BY state",
        job_id,
    )
    return {r["state"]: r["n"] for r in rows}


async def wait_states(
    pool: asyncpg.Pool[Any],
    job_id: int,
    check: Callable[[dict[str, int]], bool],
    timeout: float = 30,
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = await states(pool, job_id)
        if check(now):
            return now
        assert time.monotonic() < deadline, f"job {job_id} stayed at {now}"
        time.sleep(0.05)


async def test_a_job_survives_kill_9_and_sigterm_of_its_api_process(
    start_private_api: Callable[..., ApiProcess],
    private: asyncpg.Pool[Any],
    job_devices: Callable[..., JobDevice],
    uid: str,
) -> None:
    ids = await register(private, [f"{uid}-{i:02}" for i in range(20)], {"run": uid}, online=True)
    # Each answer takes 0.5 s: two devices are running nearly all the time.
    devs = [job_devices(d, delay=0.5) for d in ids]
    token = await admin_token(private)
    # Leases: the method's 3 s timeout (answers take 0.5 s: room for a loaded machine),
    # 5 s of work, 1 s of grace.
    env = {"FLEETLINE_API_JOBS_LEASE_GRACE_SECONDS": "1"}
    first = start_private_api("first", **env)
    # At most 4 devices a second, 2 at a time: about 5 s for the job.
    body = method_job(f"tags.run = '{uid}'", "one", timeout_s=3, batch_size=2, max_per_second=4)
    job = client(first, token).post("/v1/jobs", json=body).json()
    await wait_states(private, job["id"], lambda s: s.get("succeeded", 0) >= 5)
    first.kill()
    left = await states(private, job["id"])
    # Killed mid-job, with devices running: their leases must run out.
    assert left.get("pending", 0) > 0 and left.get("running", 0) > 0, left

    second = start_private_api("second", **env)
    c = client(second, token)
    done = wait_job(c, job["id"])
    assert done["state"] == "completed", done
    rows = outcomes(c, job["id"])
    assert done["progress"]["succeeded"] == 20 and done["progress"]["total"] == 20, [
        r for r in rows if r["state"] != "succeeded"]
    assert sorted(r["device_id"] for r in rows) == ids  # one final outcome each
    for row, dev in zip(rows, devs, strict=True):
        assert row["state"] == "succeeded" and row["status"] == 200, row
        # A device running when the process died was started again once its lease ran
        # out: its request may have reached it twice (at least once), never more often
        # than it was started.
        assert 1 <= len(dev.calls("one")) <= row["attempts"] <= 2, row
    assert sum(r["attempts"] == 2 for r in rows) == left["running"]

    # SIGTERM: the process stops claiming, lets running devices finish (they answer in
    # 0.5 s) and hands back any it cut short; nothing is left running for a lease.
    # (Twice the pace: 4 devices at once, 8 a second.)
    job = c.post("/v1/jobs", json={**body, "method": {**body["method"], "name": "two"},
                                   "batch_size": 4, "max_per_second": 8}).json()
    await wait_states(private, job["id"], lambda s: s.get("succeeded", 0) >= 5)
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert second.terminate() in (0, -15)
    assert "Application shutdown complete" in second.log_tail(5)
    left = await states(private, job["id"])
    assert "running" not in left and left.get("pending", 0) > 0, left
    third = start_private_api("third", **env)
    done = wait_job(client(third, token), job["id"])
    assert done["state"] == "completed" and done["progress"]["succeeded"] == 20, done
    for row, dev in zip(outcomes(client(third, token), job["id"]), devs, strict=True):
        assert row["attempts"] == 1 and len(dev.calls("two")) == 1, row


async def test_two_replicas_share_one_job_and_run_each_device_once(
    start_private_api: Callable[..., ApiProcess],
    private: asyncpg.Pool[Any],
    job_devices: Callable[..., JobDevice],
    uid: str,
) -> None:
    ids = await register(private, [f"{uid}-{i:02}" for i in range(24)], {"run": uid}, online=True)
    devs = [job_devices(d, delay=0.2) for d in ids]
    token = await admin_token(private)
    # Each replica runs at most 2 devices at once, the job 4: both must take part.
    replicas = [
        start_private_api(name, FLEETLINE_API_JOBS_MAX_IN_FLIGHT="2") for name in ("a", "b")
    ]
    job = (
        client(replicas[0], token)
        .post("/v1/jobs", json=method_job(f"tags.run = '{uid}'", "once", batch_size=4))
        .json()
    )
    done = wait_job(client(replicas[1], token), job["id"])
    assert done["state"] == "completed" and done["progress"]["succeeded"] == 24, done
    for dev in devs:
        assert len(dev.calls("once")) == 1, dev.device_id
    runners = await private.fetch(
        "SELECT claimed_by, attempts FROM job_devices WHERE job_id = $1", job["id"]
    )
    assert len({r["claimed_by"] for r in runners}) == 2
    assert {r["attempts"] for r in runners} == {1}


async def test_sigterm_waits_for_calls_in_flight_and_never_sends_one_twice(
    start_private_api: Callable[..., ApiProcess],
    private: asyncpg.Pool[Any],
    job_devices: Callable[..., JobDevice],
    uid: str,
) -> None:
    """A planned restart: a call answered within the shutdown grace (12 s) is recorded;
    one still waiting then fails as interrupted rather than going back to pending, where
    the next runner would send the method again (it was handed back after 5 s once)."""
    slow, silent = await register(
        private, [f"{uid}-slow", f"{uid}-silent"], {"run": uid}, online=True
    )
    devs = {slow: job_devices(slow, delay=3.0), silent: job_devices(silent, lambda _b: None)}
    token = await admin_token(private)
    first = start_private_api("first")
    body = method_job(f"tags.run = '{uid}'", "reboot", timeout_s=30, batch_size=2)
    job = client(first, token).post("/v1/jobs", json=body).json()
    wait_until(
        lambda: all(dev.calls("reboot") for dev in devs.values()),
        timeout=20,
        what="both requests sent",
    )
    started = time.monotonic()
    assert first.terminate() in (0, -15)
    took = time.monotonic() - started
    assert 8 < took < 25, took  # waited out the grace for the silent device
    assert "job devices cut short at shutdown" in first.log_tail(40)
    rows = {
        r["device_id"]: r
        for r in await private.fetch(
            "SELECT device_id, state, status, reason, attempts, error, result "
            "FROM job_devices WHERE job_id = $1",
            job["id"],
        )
    }
    assert (rows[slow]["state"], rows[slow]["status"], rows[slow]["attempts"]) == (
        "succeeded",
        200,
        1,
    )
    assert (rows[silent]["state"], rows[silent]["status"], rows[silent]["reason"]) == (
        "failed",
        503,
        "interrupted",
    )
    assert rows[silent]["attempts"] == 1 and "not sent again" in rows[silent]["error"]
    # Nothing left for the next process to run: the job is finished.
    second = start_private_api("second")
    done = wait_job(client(second, token), job["id"], timeout=10)
    assert done["state"] == "completed", done
    assert done["progress"]["succeeded"] == 1 and done["progress"]["failed"] == 1
    for dev in devs.values():
        assert len(dev.calls("reboot")) == 1, dev.device_id


async def test_a_start_that_waits_for_the_database_past_the_calls_timeout_sends_nothing(
    start_private_api: Callable[..., ApiProcess],
    private: asyncpg.Pool[Any],
    private_db: str,
    job_devices: Callable[..., JobDevice],
    uid: str,
) -> None:
    """A device's start that waits for the database (its online check blocked) past the
    call's timeout: it gives up with nothing sent, the device goes back to the job
    uncounted and runs once the database answers, and the device is called exactly once.
    (A start can no longer wait past its lease, which is longer than the timeout: before,
    it waited for the lock, the lease ran out, and only the lease check kept it from
    sending as well.)"""
    [device_id] = await register(private, [f"{uid}-d"], {"run": uid}, online=True)
    dev = job_devices(device_id)
    token = await admin_token(private)
    api = start_private_api("api", FLEETLINE_API_JOBS_LEASE_GRACE_SECONDS="1")
    blocker = await asyncpg.connect(private_db)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        # The online check before each call waits for this lock.
        await blocker.execute("LOCK TABLE device_activity IN ACCESS EXCLUSIVE MODE")
        job_id = await stored_job(private, {"name": "once", "params": {}, "timeout_s": 1},
                                  [device_id])
        deadline = time.monotonic() + 30
        while "the database was too slow" not in api.log_tail(80):
            assert time.monotonic() < deadline, "no start gave up"
            time.sleep(0.1)
        assert not dev.calls("once")
        await blocking.rollback()
    finally:
        await blocker.close()
    done = wait_job(client(api, token), job_id, timeout=30)
    assert done["state"] == "completed" and done["progress"]["succeeded"] == 1, done
    [row] = outcomes(client(api, token), job_id)
    assert row["state"] == "succeeded", row
    assert len(dev.calls("once")) == 1


async def test_a_job_the_database_cannot_compute_with_stops_no_other_job(
    start_private_api: Callable[..., ApiProcess],
    private: asyncpg.Pool[Any],
    job_devices: Callable[..., JobDevice],
    uid: str,
) -> None:
    """A rate so small that the wait it asks for overflows (1e-310 devices a second:
    accepted before the rate had a minimum) made the runner fail at every poll, and no
    job ran at all."""
    ids = await register(private, [f"{uid}-{i}" for i in range(3)], {"run": uid}, online=True)
    for device_id in ids:
        job_devices(device_id)
    c = client(start_private_api("api"), await admin_token(private))
    refused = c.post("/v1/jobs", json=method_job(f"id = '{ids[0]}'", "ping",
                                                 max_per_second=1e-310))
    assert_problem(refused, 422, "max_per_second")
    # Such a job, as it was stored then.
    slow = await stored_job(private, {"name": "ping", "params": {}, "timeout_s": 5},
                            ids[:2], max_per_second=1e-310)
    # A job that cannot run (a timeout beyond every date, stored by hand) fails with its
    # reason, and no other job with it.
    poisoned = await stored_job(private, {"name": "ping", "params": {}, "timeout_s": 1e300},
                                ids[2:])
    other = c.post("/v1/jobs", json=method_job(f"id = '{ids[2]}'", "ping")).json()
    done = wait_job(c, other["id"], timeout=20)
    assert done["state"] == "completed" and done["progress"]["succeeded"] == 1, done
    deadline = time.monotonic() + 10
    while (failed := await private.fetchrow(
            "SELECT state, error FROM jobs WHERE id = $1", poisoned))["state"] != "failed":
        assert time.monotonic() < deadline, dict(failed)
        await asyncio.sleep(0.1)
    assert failed["error"].startswith("the job cannot run: "), dict(failed)
    # The slow one started a device, and the next waits its turn (at the slowest pace a
    # job may take), not an error.
    await wait_states(private, slow, lambda s: s == {"succeeded": 1, "pending": 1})


async def test_a_process_claims_no_more_twin_devices_than_it_runs_at_once(
    start_private_api: Callable[..., ApiProcess],
    private: asyncpg.Pool[Any],
    private_db: str,
    uid: str,
) -> None:
    """Twin devices each hold one of the runner's connections: claiming more than it has
    connections for left them queued while their leases ran out."""
    ids = await register(private, [f"{uid}-{i:02}" for i in range(12)], {"run": uid})
    token = await admin_token(private)
    # 3 connections: 2 twin devices at a time, 1 connection for the rest.
    api = start_private_api("api", FLEETLINE_API_JOBS_POOL_SIZE="3")
    blocker = await asyncpg.connect(private_db)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        # Every patch waits for this lock, as it would behind a stalled publish.
        await blocker.execute("LOCK TABLE twin_desired IN EXCLUSIVE MODE")
        body = {"query": f"tags.run = '{uid}'", "type": "twin", "patch": {"n": 1}}
        created = client(api, token).post("/v1/jobs", json={**body, "batch_size": 1000})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        await wait_states(private, job_id, lambda s: s.get("running", 0) >= 2)
        seen = []
        for _ in range(15):  # the runner polls every 0.2 s: it would have claimed them all
            seen.append(await states(private, job_id))
            time.sleep(0.1)
        assert all(s == {"running": 2, "pending": 10} for s in seen), seen
        await blocking.rollback()
    finally:
        await blocker.close()
    done = wait_job(client(api, token), job_id)
    assert done["state"] == "completed" and done["progress"]["succeeded"] == 12, done
    rows = outcomes(client(api, token), job_id)
    assert sorted(r["device_id"] for r in rows) == ids
    assert {(r["state"], r["attempts"]) for r in rows} == {("succeeded", 1)}
