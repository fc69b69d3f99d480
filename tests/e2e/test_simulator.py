"""`fleetline up`'s simulated devices speak the whole device contract: they report their
firmware, apply and report the desired twin, and answer direct methods."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest

from fleetline.settings import parse_mqtt_url
from fleetline_dev.embedded import LocalMosquitto
from fleetline_dev.simulator import FIRMWARE_VERSION, device_ids, run_fleet
from tests.integration.test_api import client
from tests.support import ApiProcess, IngestProcess

pytestmark = pytest.mark.integration


async def _until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
    return found


async def test_simulated_devices_answer_twins_and_methods(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    [device_id] = device_ids(1, f"{uid}-sim-")
    c = client(api, await make_key("devices:read", "devices:write", "commands:write"))
    assert c.post("/v1/devices", json={"id": device_id}).status_code == 201
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(parse_mqtt_url(broker.url), devices=1, interval_seconds=0.5,
                  prefix=f"{uid}-sim-", stop=stop),
        name="test.simulator",
    )
    try:
        twin = await _until(
            lambda: (t := c.get(f"/v1/devices/{device_id}/twin").json())["reported"] and t,
            "the reported firmware")
        assert twin["reported"]["fw"] == FIRMWARE_VERSION
        await _until(lambda: c.get(f"/v1/devices/{device_id}").json()["online"], "online")

        patched = c.patch(f"/v1/devices/{device_id}/twin",
                          content=orjson.dumps({"interval_s": 30}),
                          headers={"Content-Type": "application/merge-patch+json"})
        assert patched.status_code == 200, patched.text
        twin = await _until(
            lambda: (t := c.get(f"/v1/devices/{device_id}/twin").json())["delta"] == {} and t,
            "the desired twin reported as applied")
        assert twin["reported"]["interval_s"] == 30
        assert twin["reported"]["desired_version"] == twin["desired_version"] == 1
        # Applied: at one reading per 30 s instead of 2 per s, no more arrive for a while.
        count = "SELECT count(*) FROM readings WHERE device_id = $1"
        await asyncio.sleep(1.5)  # what was in flight when the twin changed
        before = await db.fetchval(count, device_id)
        await asyncio.sleep(3)
        assert await db.fetchval(count, device_id) - before <= 4  # one tick, 4 metrics

        # The simulator runs on this event loop: wait for the answer off it.
        ping = await asyncio.to_thread(c.post, f"/v1/devices/{device_id}/methods/ping",
                                       json={"params": {"n": 1}, "timeout_s": 10})
        assert ping.status_code == 200, ping.text
        assert ping.json()["status"] == 200
        assert ping.json()["payload"] == {"pong": True, "params": {"n": 1}}
        unknown = await asyncio.to_thread(
            c.post, f"/v1/devices/{device_id}/methods/selfdestruct", json={"timeout_s": 10})
        assert unknown.status_code == 200 and unknown.json()["status"] == 404
    finally:
        stop.set()
        await asyncio.wait_for(fleet, 20)
        await db.execute("UPDATE device_activity SET online = false WHERE device_id = $1",
                         device_id)
