"""A rollout over 500 simulated devices, 10% of which fail to apply the update, on a
backend of its own (the auth broker, ingest, the API with its devices' HTTPS listener):
the simulator's devices log in with their keys, take the notification, ask for a URL
over MQTT, download over HTTPS and report every state. The rollout stops at its failure
threshold: paused after a wave, with the devices that failed exactly those the
simulator chose, and no device of a later wave touched."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fleetline import releases
from fleetline.settings import parse_mqtt_url
from fleetline_dev.certs import TlsFiles
from fleetline_dev.simulated_updates import UpdatePolicy
from fleetline_dev.simulator import MODEL, device_ids, register_fleet, run_fleet
from tests.integration.test_rollouts import release
from tests.stack import KEY_SECRET, Backend, device_listener, serve_stack
from tests.support import release_key_file

pytestmark = pytest.mark.integration

FLEET = 500
FAIL_SHARE = 0.10
THRESHOLD = 5.0


@pytest.fixture(scope="module")
async def stack(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    env = device_listener(tls_files)
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "rollout", env) as served:
        yield served


async def test_a_rollout_over_500_simulated_devices_stops_at_its_threshold(
    stack: Backend, tls_files: TlsFiles
) -> None:
    c = httpx.Client(base_url=stack.api.url, timeout=30,
                     headers={"Authorization": f"Bearer {stack.key}"})
    prefix = "fleet500-"
    ids = device_ids(FLEET, prefix)
    keys = await register_fleet(stack.database_url, ids, KEY_SECRET)
    fw = release(c, "2.0.0", MODEL)
    point = releases.public_point(releases.load_key(release_key_file()))
    policy = UpdatePolicy(release_key=point, ca_file=tls_files.ca_cert, fail_share=FAIL_SHARE,
                          reboot_seconds=0.2)
    stop = asyncio.Event()
    fleet = asyncio.create_task(run_fleet(
        parse_mqtt_url(f"mqtt://127.0.0.1:{stack.broker.port}"), devices=FLEET,
        interval_seconds=5, prefix=prefix, stop=stop, keys=keys, updates=policy))
    try:
        async def online() -> int:
            return int(await stack.db.fetchval(
                "SELECT count(*) FROM device_status WHERE online AND device_id LIKE $1 || '%'",
                prefix))

        for _ in range(600):
            if await online() == FLEET:
                break
            await asyncio.sleep(0.1)
        assert await online() == FLEET, "the simulated fleet did not come online"

        created = c.post("/v1/jobs", json={
            "type": "rollout", "query": "tags.source = 'simulator'", "firmware_id": fw["id"],
            "canary": 20, "wave_size": 100, "batch_size": 50,
            "failure_threshold_percent": THRESHOLD, "on_failure": "pause"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert created.json()["progress"]["total"] == FLEET

        job: dict[str, Any] = {}
        for _ in range(1200):
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["state"] != "running" and job["state"] != "queued":
                break
            await asyncio.sleep(0.1)
        assert job["state"] == "paused", job
        assert job["paused_by"] == "failure threshold"
        progress = job["progress"]
        finished = progress["succeeded"] + progress["failed"] + progress["rolled_back"]
        assert progress["failed"] * 100 > THRESHOLD * finished, progress
        assert progress["pending"] > 0 and progress["pending"] + finished == FLEET, progress
        assert progress["running"] == 0, progress

        rows = []
        cursor = None
        while True:
            page = c.get(f"/v1/jobs/{job_id}/devices",
                         params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
            rows += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        # The waves went in order, and stopped at one: the devices started are whole
        # waves, the first ones.
        started = {r["wave"] for r in rows if r["state"] != "pending"}
        waiting = {r["wave"] for r in rows if r["state"] == "pending"}
        assert max(started) < min(waiting), (started, waiting)
        for row in rows:
            if row["state"] == "pending":
                continue
            chosen = random.Random(f"{row['device_id']}/{job_id}").random() < FAIL_SHARE
            state = "failed" if chosen else "succeeded"
            assert (row["state"], row["phase"]) == (state, state), (row["error"], row)
            if chosen:
                assert row["error"] == "simulated: the flash write failed", row
        # The devices that updated run 2.0.0, as their twins say.
        updated = [r["device_id"] for r in rows if r["state"] == "succeeded"]
        fw_reported = await stack.db.fetch(
            "SELECT reported ->> 'fw' AS fw FROM twin_reported WHERE device_id = ANY($1)",
            updated)
        assert {r["fw"] for r in fw_reported} == {"2.0.0"}
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    finally:
        stop.set()
        await asyncio.wait_for(fleet, 60)
