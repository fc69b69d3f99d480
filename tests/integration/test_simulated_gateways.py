"""The simulated fleet's gateways (fleetline_dev/simulated_gateways.py) on a whole backend
of their own (the broker with the auth plugin, ingest, the API): a gateway logs in with
its own key, its children are created by the broker on their first use, their readings
are stored as theirs, with the gateway as their parent, and the gateway answers the
cloud for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from fleetline.mqtt import make_client
from fleetline.protocol import STATUS, topic_for
from fleetline.settings import parse_mqtt_url
from fleetline_dev.certs import TlsFiles
from fleetline_dev.simulated_gateways import (
    CHILD_MODEL,
    TAGS,
    child_ids,
    gateway_ids,
    register_gateways,
    run_gateways,
)
from fleetline_dev.simulator import FIRMWARE_VERSION
from tests.stack import KEY_SECRET, Backend, serve_stack, service_url

pytestmark = pytest.mark.integration

CHILDREN = 3
METRICS = ["door_open", "fw", "humidity", "temperature"]


@pytest.fixture(scope="module")
async def stack(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "simgateways") as served:
        yield served


async def _until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return found


async def test_a_simulated_gateway_publishes_for_its_children_and_answers_for_them(
    stack: Backend, uid: str
) -> None:
    [gw] = gateway_ids(1, f"{uid}-gw-")
    children = child_ids(gw, CHILDREN)
    keys = await register_gateways(stack.database_url, [gw], KEY_SECRET, children=CHILDREN)
    assert list(keys) == [gw]
    db = stack.db
    # None of the children is registered: the broker creates them on first use.
    assert await db.fetchval("SELECT count(*) FROM devices WHERE id = ANY($1)", children) == 0
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_gateways(
            parse_mqtt_url(stack.broker.url),
            gateways=1,
            children=CHILDREN,
            interval_seconds=0.3,
            prefix=f"{uid}-gw-",
            stop=stop,
            keys=keys,
        ),
        name="test.gateways",
    )
    api = httpx.AsyncClient(
        base_url=stack.api.url, timeout=15, headers={"Authorization": f"Bearer {stack.key}"}
    )
    try:

        async def stored() -> bool:
            rows = await db.fetch(
                "SELECT device_id, array_agg(DISTINCT metric ORDER BY metric) AS metrics, "
                "count(*) FILTER (WHERE metric = 'temperature') AS n FROM readings "
                "WHERE device_id = ANY($1) GROUP BY device_id",
                children,
            )
            return len(rows) == CHILDREN and all(
                r["metrics"] == METRICS and r["n"] >= 2 for r in rows
            )

        await _until(stored, "two readings of every child stored")
        family = await db.fetch(
            "SELECT id, parent_id, tags, key_version, gateway FROM devices "
            "WHERE id = ANY($1) OR parent_id = $2 ORDER BY id",
            children,
            gw,
        )
        assert [(r["id"], r["parent_id"], r["key_version"], r["gateway"]) for r in family] == [
            (c, gw, 0, None) for c in children
        ]
        assert all(orjson.loads(r["tags"]) == TAGS for r in family)
        # Each child as the API shows it: behind the gateway, online, its own twin.
        for c in children:
            device = (await api.get(f"/v1/devices/{c}")).json()
            assert (device["parent"], device["tags"]) == (gw, TAGS), device
        await _until(lambda: _all_online(api, children), "the children online")
        twin = (await api.get(f"/v1/devices/{children[1]}/twin")).json()
        assert twin["reported"] == {"fw": FIRMWARE_VERSION, "model": CHILD_MODEL,
                                    "units": {"temperature": "°C", "humidity": "%"}}
        # The gateway has room for its children in its own limits.
        limits = (await api.get(f"/v1/devices/{gw}/limits")).json()
        assert limits["limits"]["selector"] == f"device:{gw}"
        assert limits["limits"]["messages_per_second"] == 20 * (CHILDREN + 1)
        assert limits["refused"] is None

        # The cloud reaches a child through its gateway.
        child = children[2]
        ping = await api.post(
            f"/v1/devices/{child}/methods/ping", json={"params": {"n": 7}, "timeout_s": 10}
        )
        assert ping.status_code == 200, ping.text
        assert ping.json()["payload"] == {"pong": True, "params": {"n": 7}}
        unknown = await api.post(
            f"/v1/devices/{child}/methods/selfdestruct", json={"timeout_s": 10}
        )
        assert unknown.status_code == 200 and unknown.json()["status"] == 404, unknown.text
        sent = await api.post(f"/v1/devices/{child}/messages", json={"body": {"beep": 1}})
        assert sent.status_code == 201, sent.text
        message = f"/v1/devices/{child}/messages/{sent.json()['id']}"

        async def completed() -> bool:
            return bool((await api.get(message)).json()["state"] == "completed")

        await _until(completed, "the child's message completed")
        patched = await api.patch(f"/v1/devices/{child}/twin", json={"interval_s": 30})
        assert patched.status_code == 200, patched.text

        async def applied() -> dict[str, Any] | None:
            doc: dict[str, Any] = (await api.get(f"/v1/devices/{child}/twin")).json()
            return doc if doc["delta"] == {} and doc["reported"].get("interval_s") else None

        twin = await _until(applied, "the child's desired twin reported as applied")
        assert twin["reported"]["interval_s"] == 30 and twin["reported"]["desired_version"] == 1
        # Only that child slowed down (one reading per 30 s; the others every 0.3 s).
        count = "SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'temperature'"
        await asyncio.sleep(0.5)  # what was in flight when the twin changed
        before = [await db.fetchval(count, c) for c in (child, children[0])]
        await asyncio.sleep(1.5)
        after = [await db.fetchval(count, c) for c in (child, children[0])]
        assert after[0] - before[0] <= 1 and after[1] - before[1] >= 3, (before, after)
    finally:
        stop.set()
        await asyncio.wait_for(fleet, 20)
    # Stopped, the gateway said each child offline (retained), then itself.
    family = [gw, *children]
    await _until(lambda: _all_online(api, family, online=False), "all offline")
    await api.aclose()
    assert await _retained_status(stack, family) == dict.fromkeys(family, b"offline")


async def _all_online(api: httpx.AsyncClient, ids: list[str], *, online: bool = True) -> bool:
    for device_id in ids:
        device = (await api.get(f"/v1/devices/{device_id}")).json()
        if device["online"] is not online or (online and device["offline_reason"]):
            return False
    return True


async def _retained_status(stack: Backend, ids: list[str]) -> dict[str, bytes]:
    """The status each device has retained on the broker (read as ingest's account)."""
    found: dict[str, bytes] = {}
    client = make_client(
        parse_mqtt_url(service_url(stack.broker)),
        identifier=f"t-{ids[0]}",
        protocol="5",
        persistent=False,
    )
    async with client:
        await client.subscribe([(topic_for(d, STATUS), 1) for d in ids])
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert message.retain and isinstance(message.payload, bytes)
                found[message.topic.value.split("/")[1]] = message.payload
                if len(found) == len(ids):
                    break
    return found
