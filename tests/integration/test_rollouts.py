"""Firmware rollouts (jobs of type `rollout`) against the real API, ingest, broker and
database: devices on the real broker are notified through their desired twin and report
their phases over MQTT, which ingest stores and the API's sweep follows; waves, the
failure threshold (pause and abort), timeouts, refused reports, pause/resume, the time
window, and what a rollout refuses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from fleetline import apikeys
from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import migrated_database
from tests.integration.test_api import assert_problem, client
from tests.integration.test_cli import fleetline
from tests.integration.test_firmware import declare, put_part
from tests.integration.test_jobs import (  # noqa: F401 - fixtures, _only_our_jobs autouse
    JobDevice,
    _only_our_jobs,
    admin_token,
    outcomes,
    private,
    private_db,
    register,
    start_private_api,
    wait_job,
)
from tests.support import ApiProcess, IngestProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ingest")]

FAST = {"notified": 30, "downloading": 30, "verifying": 30, "applying": 30, "rebooting": 30}


def release(c: httpx.Client, version: str, target: str) -> dict[str, Any]:
    """A released firmware image of a few bytes."""
    image = f"image {version} {target}".encode() * 10
    made = declare(c, image, version, target)
    assert made.status_code == 201, made.text
    done = put_part(c, made.json()["id"], image, 0, len(image) - 1)
    assert done.status_code == 200, done.text
    released: dict[str, Any] = done.json()
    assert released["status"] == "released"
    return released


def rollout(query: str, firmware_id: int, **extra: Any) -> dict[str, Any]:
    return {"type": "rollout", "query": query, "firmware_id": firmware_id,
            "timeouts": FAST, **extra}


def notified(dev: JobDevice, job_id: int, timeout: float = 30) -> dict[str, Any]:
    """The `firmware` member of the desired twin that notified ``dev`` of the rollout."""
    def find() -> dict[str, Any] | None:
        for doc, _retained in dev.documents():
            fw = doc["desired"].get("firmware")
            if fw and fw["rollout"] == job_id:
                found: dict[str, Any] = fw
                return found
        return None

    found: dict[str, Any] = wait_until(find, timeout=timeout, what=f"{dev.device_id} notified")
    return found


def report(dev: JobDevice, job_id: int, state: str, **extra: Any) -> None:
    body = {"firmware": {"rollout": job_id, "state": state, **extra}}
    dev.device.client.publish(
        f"devices/{dev.device_id}/twin/reported", orjson.dumps(body), qos=1
    ).wait_for_publish(10)


def device_row(c: httpx.Client, job_id: int, device_id: str) -> dict[str, Any]:
    rows = {r["device_id"]: r for r in outcomes(c, job_id)}
    return rows[device_id]


def wait_phase(c: httpx.Client, job_id: int, device_id: str, phase: str,
               **expect: Any) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        row = device_row(c, job_id, device_id)
        ok = row["phase"] == phase and all(row[k] == v for k, v in expect.items())
        return row if ok else None

    found: dict[str, Any] = wait_until(check, timeout=30, what=f"{device_id} {phase}")
    return found


# The module's own database, API and ingest (on the shared broker): every API process
# runs the rollouts of its database, and another one (the secure broker's, which these
# devices do not use) would notify them where they are not.
@pytest.fixture(scope="module")
async def rollouts_db(admin_url: str) -> AsyncIterator[str]:
    async with migrated_database(admin_url, "fleetline_rollouts") as url:
        yield url


@pytest.fixture(scope="module")
async def db(rollouts_db: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await asyncpg.create_pool(rollouts_db, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def api(rollouts_db: str, broker: LocalMosquitto, artifacts: Path) -> Iterator[ApiProcess]:
    proc = ApiProcess(database_url=rollouts_db, mqtt_url=broker.url, log_dir=artifacts,
                      name="rollouts")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ingest(rollouts_db: str, broker: LocalMosquitto, artifacts: Path) -> Iterator[IngestProcess]:
    """Ingest stores what the devices report."""
    proc = IngestProcess(database_url=rollouts_db, mqtt_url=broker.url, log_dir=artifacts,
                         name="rollouts")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def make_key(db: asyncpg.Pool[Any]) -> Callable[..., Any]:
    async def make(*scopes: str) -> str:
        async with db.acquire() as con:
            return (await apikeys.create_key(con, name="test", scopes=list(scopes))).token

    return make


@pytest.fixture
def fleet(broker: LocalMosquitto) -> Iterator[Callable[[list[str]], dict[str, JobDevice]]]:
    """Devices on the real broker, keeping the desired documents they receive."""
    made: list[JobDevice] = []

    def make(ids: list[str]) -> dict[str, JobDevice]:
        made.extend(JobDevice(broker.url, d) for d in ids)
        return {d.device_id: d for d in made if d.device_id in ids}

    yield make
    for dev in made:
        dev.close()


async def test_a_rollout_moves_each_device_through_the_phases_it_reports_in_waves(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
    fleet: Callable[[list[str]], dict[str, JobDevice]],
) -> None:
    ids = await register(db, [f"{uid}-{i}" for i in range(4)], {"run": uid}, online=True)
    devs = fleet(ids)
    c = client(api, await make_key("commands:write", "firmware:write"))
    fw = release(c, "2.0.0", f"board-{uid}")
    created = c.post("/v1/jobs", json=rollout(
        f"tags.run = '{uid}'", fw["id"], canary=1, wave_size=2, batch_size=2,
        failure_threshold_percent=50))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["type"] == "rollout" and job["progress"]["total"] == 4
    assert job["rollout"]["version"] == "2.0.0" and job["rollout"]["canary"] == 1
    jid = job["id"]
    waves = {r["device_id"]: r["wave"] for r in outcomes(c, jid)}
    assert sorted(waves.values()) == [0, 1, 1, 2]
    canary, second, third, last = sorted(ids, key=lambda d: waves[d])

    # The canary alone is notified, with the release as devices check it.
    told = notified(devs[canary], jid)
    assert told == {"rollout": jid, "id": fw["id"], "version": "2.0.0", "kind": "image",
                    "size": fw["size"], "manifest": fw["manifest"], "signature": fw["signature"]}
    assert wait_phase(c, jid, canary, "notified")["state"] == "running"
    for state, extra in (("downloading", {"progress": 40}), ("downloading", {"progress": 100}),
                         ("verifying", {}), ("applying", {}), ("rebooting", {})):
        report(devs[canary], jid, state, **extra)
        wait_phase(c, jid, canary, state, progress=extra.get("progress"))
    phases = c.get(f"/v1/jobs/{jid}").json()["rollout"]["phases"]
    assert phases == {"notified": 0, "downloading": 0, "verifying": 0, "applying": 0,
                      "rebooting": 1}
    assert all(not devs[d].documents() for d in (second, third, last))  # the wave waits
    # A report that claims success on another version is refused, and so is a step back.
    report(devs[canary], jid, "succeeded", running="1.0.0")
    row = wait_until(lambda: (r := device_row(c, jid, canary))["refused_reports"] == 1 and r,
                     timeout=30, what="the refused report")
    assert row["phase"] == "rebooting" and "running '1.0.0'" in row["refused_report"]
    report(devs[canary], jid, "downloading", progress=10)
    row = wait_until(lambda: (r := device_row(c, jid, canary))["refused_reports"] == 2 and r,
                     timeout=30, what="the step back")
    assert (row["phase"], row["refused_report"]) == ("rebooting", "downloading after rebooting")
    report(devs[canary], jid, "succeeded", running="2.0.0")
    row = wait_phase(c, jid, canary, "succeeded", state="succeeded", reason="updated")
    assert row["finished_at"]

    # The next wave: two at once; one fails with its reason, one goes back.
    for d in (second, third):
        notified(devs[d], jid)
    report(devs[second], jid, "failed", reason="flash write failed at 0x10000")
    report(devs[third], jid, "applying")
    report(devs[third], jid, "rolled_back", reason="v2 did not come up; back to 1.0.0")
    wait_phase(c, jid, second, "failed", state="failed", reason="device",
               error="flash write failed at 0x10000")
    wait_phase(c, jid, third, "rolled_back", state="rolled_back", reason="rolled_back")
    # 2 of 3 finished failed (67% > 50%): paused before the last wave.
    paused = wait_job(c, jid, until=lambda j: j["state"] == "paused")
    assert paused["paused_by"] == "failure threshold"
    assert "2 of 3 devices" in paused["error"] and paused["progress"]["pending"] == 1
    assert not devs[last].documents()
    # Resumed: the threshold counts from here, and the last device updates.
    resumed = c.post(f"/v1/jobs/{jid}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    notified(devs[last], jid)
    report(devs[last], jid, "succeeded", running="2.0.0")
    done = wait_job(c, jid)
    assert done["state"] == "completed"
    progress = done["progress"]
    assert (progress["succeeded"], progress["failed"], progress["rolled_back"]) == (2, 1, 1)


async def test_a_rollout_aborts_at_its_threshold_and_silent_devices_time_out(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
    fleet: Callable[[list[str]], dict[str, JobDevice]],
) -> None:
    ids = await register(db, [f"{uid}-{i}" for i in range(6)], {"run": uid}, online=True)
    devs = fleet(ids)
    c = client(api, await make_key("admin"))
    fw = release(c, "3.1.0", f"board-{uid}")
    timeouts = {**FAST, "notified": 2}
    job = c.post("/v1/jobs", json=rollout(
        f"tags.run = '{uid}'", fw["id"], canary=2, batch_size=2, on_failure="abort",
        failure_threshold_percent=0, timeouts=timeouts)).json()
    jid = job["id"]
    canaries = [r["device_id"] for r in outcomes(c, jid) if r["wave"] == 0]
    # One canary goes quiet after the notification: it fails on its timeout.
    for d in canaries:
        notified(devs[d], jid)
    report(devs[canaries[0]], jid, "downloading", progress=5)
    wait_phase(c, jid, canaries[0], "downloading")
    row = wait_phase(c, jid, canaries[1], "notified", state="failed", reason="timeout")
    assert row["error"] == "no report past notified within 2 s"
    report(devs[canaries[0]], jid, "succeeded", running="3.1.0")
    done = wait_job(c, jid)
    assert done["state"] == "failed" and "1 of 2 devices" in done["error"]
    assert done["progress"]["cancelled"] == 4 and done["progress"]["succeeded"] == 1
    assert all(not devs[d].documents() for d in ids if d not in canaries)


async def test_a_rollout_waits_for_its_window_and_pauses_on_demand(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
    fleet: Callable[[list[str]], dict[str, JobDevice]],
) -> None:
    ids = await register(db, [f"{uid}-{i}" for i in range(2)], {"run": uid}, online=True)
    devs = fleet(ids)
    c = client(api, await make_key("admin"))
    fw = release(c, "1.2.0", f"board-{uid}")
    now = datetime.now(UTC)
    start, end = (now + timedelta(hours=2)).time(), (now + timedelta(hours=3)).time()
    window = {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}
    job = c.post("/v1/jobs", json=rollout(
        f"tags.run = '{uid}'", fw["id"], window=window, canary=2)).json()
    jid = job["id"]
    for _ in range(300):
        waiting_until = await db.fetchval(
            "SELECT next_batch_at FROM jobs WHERE id = $1 AND "
            "next_batch_at > now() + interval '1 hour'", jid)
        if waiting_until is not None:
            break
        await asyncio.sleep(0.1)
    assert waiting_until is not None, "the rollout did not wait for its window"
    assert waiting_until.astimezone(UTC).strftime("%H:%M") == window["start"]
    assert c.get(f"/v1/jobs/{jid}").json()["state"] == "queued"
    assert not any(d.documents() for d in devs.values())
    # Paused, it is not started even when its window opens; resumed, it is.
    paused = c.post(f"/v1/jobs/{jid}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert_problem(c.post(f"/v1/jobs/{jid}/pause"), 409, "is paused")
    await db.execute("UPDATE jobs SET spec = spec - 'window' WHERE id = $1", jid)
    assert c.post(f"/v1/jobs/{jid}/resume").json()["state"] == "queued"
    for d in ids:
        notified(devs[d], jid)
    assert_problem(c.post(f"/v1/jobs/{jid}/resume"), 409, "only a paused job resumes")
    cancelled = c.post(f"/v1/jobs/{jid}/cancel").json()
    assert cancelled["state"] == "cancelled"


async def test_invalid_rollouts_get_4xx_problems(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
) -> None:
    await register(db, [f"{uid}-0"], {"run": uid})
    admin = client(api, await make_key("admin"))
    fw = release(admin, "9.0.0", f"board-{uid}")
    query = f"tags.run = '{uid}'"
    commands = client(api, await make_key("commands:write"))
    assert_problem(commands.post("/v1/jobs", json=rollout(query, fw["id"])), 403,
                   "firmware:write")
    assert_problem(admin.post("/v1/jobs", json=rollout(query, 2**52)), 404, "not found")
    image = b"x" * 100
    uploading = declare(admin, image, "9.0.1", f"board-{uid}").json()
    assert_problem(admin.post("/v1/jobs", json=rollout(query, uploading["id"])), 409,
                   "still being uploaded")
    assert_problem(admin.post("/v1/jobs", json=rollout(
        query, fw["id"], window={"start": "01:00", "end": "01:00"})), 400, "the same time")
    for bad in ({"window": {"start": "25:00", "end": "01:00"}},
                {"window": {"start": "01:00:00Z", "end": "02:00"}},
                {"failure_threshold_percent": 101}, {"canary": -1},
                {"on_failure": "explode"}, {"timeouts": {"notified": 0}},
                {"timeouts": {"sleeping": 5}}, {"canary_percent": 0}):
        assert_problem(admin.post("/v1/jobs", json=rollout(query, fw["id"], **bad)), 422)


async def test_the_command_line_creates_follows_and_lists_rollouts(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
    fleet: Callable[[list[str]], dict[str, JobDevice]],
) -> None:
    ids = await register(db, [f"{uid}-{i}" for i in range(2)], {"run": uid}, online=True)
    devs = fleet(ids)
    key = await make_key("admin")
    env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": key}
    fw = release(client(api, key), "4.0.0", f"board-{uid}")
    made = fleetline("rollout", "create", str(fw["id"]), "--query", f"tags.run = '{uid}'",
                     "--canary", "2", "--threshold", "50", "--json", env=env)
    assert made.returncode == 0, made.stderr
    jid = json.loads(made.stdout)["id"]
    watching = subprocess.Popen(
        [sys.executable, "-m", "fleetline_cli", "rollout", "show", str(jid), "--watch"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for d in ids:
        notified(devs[d], jid)
        report(devs[d], jid, "succeeded", running="4.0.0")
    out, err = watching.communicate(timeout=60)
    assert watching.returncode == 0, err
    assert f"rollout {jid}: completed, 100% of 2 (2 succeeded)" in out
    assert f"firmware {fw['id']} (image 4.0.0)" in out and "canary 2" in out
    assert "2/2" in err  # the progress bar, on the terminal's stream
    listed = fleetline("rollout", "list", env=env).stdout.splitlines()
    assert listed[0].split()[:3] == ["id", "firmware", "state"]
    assert any(line.split()[:4] == [str(jid), str(fw["id"]), "(4.0.0)", "completed"]
               for line in listed)
    rows = fleetline("rollout", "devices", str(jid), env=env).stdout.splitlines()
    assert rows[0].split() == ["device", "wave", "state", "phase", "progress", "error"]
    assert sorted(r.split()[0] for r in rows[1:]) == sorted(ids)
    late = fleetline("rollout", "pause", str(jid), env=env)
    assert late.returncode == 1 and "is completed" in late.stderr
    bad = fleetline("rollout", "create", str(fw["id"]), "--query", "id = 'x'", "--window",
                    "0100", env=env)
    assert bad.returncode == 2 and "HH:MM-HH:MM" in bad.stderr


async def test_failures_the_runner_records_stop_a_rollout_before_its_next_wave(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
    fleet: Callable[[list[str]], dict[str, JobDevice]],
) -> None:
    ids = await register(db, [f"{uid}-{i}" for i in range(3)], {"run": uid}, online=True)
    devs = fleet(ids)
    c = client(api, await make_key("admin"))
    fw = release(c, "6.0.0", f"board-{uid}")
    # Outside its window at first, so its canary can be deleted before it is notified.
    now = datetime.now(UTC)
    window = {"start": (now + timedelta(hours=2)).strftime("%H:%M"),
              "end": (now + timedelta(hours=3)).strftime("%H:%M")}
    jid = c.post("/v1/jobs", json=rollout(
        f"tags.run = '{uid}'", fw["id"], canary=1, failure_threshold_percent=0,
        window=window)).json()["id"]
    # Another rollout over the same devices is refused while this one has not finished.
    assert_problem(c.post("/v1/jobs", json=rollout(f"tags.run = '{uid}'", fw["id"])), 409,
                   f"3 of the devices are in rollout {jid}")
    [canary] = [r["device_id"] for r in outcomes(c, jid) if r["wave"] == 0]
    assert c.delete(f"/v1/devices/{canary}").status_code == 204
    await db.execute("UPDATE jobs SET spec = spec - 'window', next_batch_at = now() "
                     "WHERE id = $1", jid)
    paused = wait_job(c, jid, until=lambda j: j["state"] == "paused")
    assert paused["paused_by"] == "failure threshold" and "1 of 1 devices" in paused["error"]
    row = device_row(c, jid, canary)
    assert (row["state"], row["reason"]) == ("failed", "not_found")
    assert paused["progress"]["pending"] == 2
    assert not any(devs[d].documents() for d in ids if d != canary)
    assert c.post(f"/v1/jobs/{jid}/cancel").json()["state"] == "cancelled"


async def test_a_rollout_survives_kill_9_of_the_api_and_of_ingest(
    start_private_api: Callable[..., ApiProcess],  # noqa: F811
    start_ingest: Callable[..., IngestProcess],
    private: asyncpg.Pool[Any],  # noqa: F811
    private_db: str,  # noqa: F811
    fleet: Callable[[list[str]], dict[str, JobDevice]],
    uid: str,
) -> None:
    ids = await register(private, [f"{uid}-{i}" for i in range(4)], {"run": uid}, online=True)
    devs = fleet(ids)
    token = await admin_token(private)
    ingest = start_ingest(database=private_db, name=f"{uid}-ingest")
    first = start_private_api("first")
    c = client(first, token)
    fw = release(c, "7.0.0", f"board-{uid}")
    jid = c.post("/v1/jobs", json=rollout(f"tags.run = '{uid}'", fw["id"], canary=4,
                                          batch_size=4)).json()["id"]
    for d in ids:
        notified(devs[d], jid)
        report(devs[d], jid, "downloading", progress=50)
    wait_until(lambda: all(r["phase"] == "downloading" for r in outcomes(c, jid)),
               timeout=30, what="every device downloading")
    # Both die; the devices report meanwhile (the broker keeps ingest's session).
    first.kill()
    ingest.kill()
    for d in ids:
        report(devs[d], jid, "succeeded", running="7.0.0")
    start_ingest(database=private_db, name=f"{uid}-ingest")  # its session, kept
    second = start_private_api("second")
    done = wait_job(client(second, token), jid)
    assert done["state"] == "completed" and done["progress"]["succeeded"] == 4, done
    rows = outcomes(client(second, token), jid)
    assert all((r["state"], r["attempts"]) == ("succeeded", 1) for r in rows), rows
