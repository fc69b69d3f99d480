"""Jobs over 100 real devices: paho clients on the real broker, registered over REST,
online as the real ingest records their status; a method job, a twin job and a job
over a mixed fleet, each ending with one outcome per device."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.integration.test_api import client
from tests.integration.test_jobs import (
    JobDevice,
    cancel_leftover_jobs,
    job_devices,  # noqa: F401 (a fixture)
    method_job,
    offline,
    outcomes,
    wait_job,
)
from tests.support import ApiProcess, IngestProcess, wait_until

pytestmark = pytest.mark.integration
FLEET = 100


@pytest.fixture(autouse=True)
async def _only_our_jobs(db: asyncpg.Pool[Any]) -> None:
    await cancel_leftover_jobs(db)


async def test_jobs_over_100_devices_end_with_one_outcome_per_device(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    job_devices: Callable[..., JobDevice],  # noqa: F811
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    start_ingest()
    c = client(api, await make_key("admin"))
    ids = [f"{uid}-{i:03}" for i in range(FLEET)]
    silent = [f"{uid}-silent-{i}" for i in range(3)]
    failing = [f"{uid}-failing-{i}" for i in range(2)]
    away = [f"{uid}-away-{i}" for i in range(5)]
    for device_id in ids:
        assert c.post("/v1/devices", json={"id": device_id, "tags": {"run": uid}}).is_success
    for device_id in silent + failing + away:
        assert c.post("/v1/devices", json={"id": device_id, "tags": {"extra": uid}}).is_success
    try:
        fleet = {d: job_devices(d) for d in ids}
        others = [job_devices(d, lambda _b: None) for d in silent] + [
            job_devices(d, lambda _b: (500, {"error": "busy"})) for d in failing
        ]
        for dev in [*fleet.values(), *others]:
            dev.device.publish(b"online", kind="status")

        async def online() -> int:
            return int(
                await db.fetchval(
                    "SELECT count(*) FROM device_status WHERE device_id LIKE $1 || '%' AND online",
                    uid,
                )
            )

        deadline = time.monotonic() + 30
        while await online() < FLEET + len(others):
            assert time.monotonic() < deadline, "ingest did not record the devices online"
            time.sleep(0.1)

        # A method on every device of the run: each answers, each answer is kept.
        job = c.post(
            "/v1/jobs",
            json=method_job(f"tags.run = '{uid}'", "ping", params={"n": 7}, batch_size=25),
        ).json()
        assert job["progress"]["total"] == FLEET
        done = wait_job(c, job["id"])
        assert done["state"] == "completed"
        assert done["progress"]["succeeded"] == FLEET and done["progress"]["percent"] == 100.0
        rows = outcomes(c, job["id"], limit=30)
        assert [r["device_id"] for r in rows] == ids
        for row in rows:
            assert (row["state"], row["status"], row["attempts"]) == ("succeeded", 200, 1)
            answer = {"device": row["device_id"], "method": "ping", "n": 7}
            assert row["result"]["payload"] == answer
        for dev in fleet.values():
            assert dev.calls("ping") == [{"method": "ping", "params": {"n": 7}}]

        # A twin patch: every device gets the retained desired document.
        patch = {"fw": {"target": "2.0"}, "run": uid}
        job = c.post(
            "/v1/jobs",
            json={"query": f"tags.run = '{uid}'", "type": "twin", "patch": patch, "batch_size": 50},
        ).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "completed" and done["progress"]["succeeded"] == FLEET
        assert done["patch"] == patch
        for row in outcomes(c, job["id"], limit=1000):
            assert (row["state"], row["status"], row["reason"]) == ("succeeded", 200, "applied")
            assert row["result"] == {"version": 1, "published": True}
        for dev in fleet.values():
            # (A hundred clients' threads in this process, on a busy machine: seconds.)
            wait_until(dev.documents, timeout=30, what=f"{dev.device_id}'s desired document")
            assert [doc for doc, _ in dev.documents()] == [{"version": 1, "desired": patch}]
        twin = c.get(f"/v1/devices/{ids[0]}/twin").json()
        assert twin["desired"] == patch and twin["desired_published_version"] == 1
        # Retained: a device that connects afterwards gets it at once.
        fleet[ids[0]].close()
        again = job_devices(ids[0])
        wait_until(again.documents, timeout=10, what="the retained document")
        assert again.documents() == [({"version": 1, "desired": patch}, True)]

        # A mixed fleet: answering, silent, answering with an error, never connected.
        query = f"tags.run = '{uid}' OR tags.extra = '{uid}'"
        job = c.post(
            "/v1/jobs", json=method_job(query, "mix", timeout_s=2, batch_size=50)
        ).json()
        done = wait_job(c, job["id"])
        assert done["progress"] == {
            "total": FLEET + 10, "pending": 0, "running": 0, "succeeded": FLEET,
            "failed": 10, "rolled_back": 0, "cancelled": 0, "percent": 100.0,
        }
        failed = {r["device_id"]: r for r in outcomes(c, job["id"], state="failed")}
        assert sorted(failed) == sorted(silent + failing + away)
        for device_id in silent:
            assert (failed[device_id]["status"], failed[device_id]["reason"]) == (504, "timeout")
            assert "did not answer mix within 2 s" in failed[device_id]["error"]
        for device_id in failing:
            assert (failed[device_id]["status"], failed[device_id]["reason"]) == (500, "answered")
            assert failed[device_id]["result"]["payload"] == {"error": "busy"}
        for device_id in away:
            assert (failed[device_id]["status"], failed[device_id]["reason"]) == (409, "offline")
        assert len(outcomes(c, job["id"], state="succeeded")) == FLEET
    finally:
        await offline(db, uid)
