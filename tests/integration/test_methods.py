"""Direct methods: the API as a process calling real (paho) devices on the real broker."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest

from fleetline_api.settings import ApiSettings
from fleetline_api.workers.broker import (
    BrokerLink,
    BrokerUnavailableError,
    MethodTimeoutError,
    TooManyCallsError,
)
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem, client
from tests.support import DEVICE_KEY_SECRET, ApiProcess, Device, IngestProcess, wait_until

pytestmark = pytest.mark.integration

# (request id, request body) -> the raw response to publish, or None to stay silent.
Answer = Callable[[str, dict[str, Any]], bytes | None]


def echo(_request_id: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps({"status": 200, "payload": {"method": body["method"], **body["params"]}})


class MethodDevice:
    """A device that takes method requests on its own topic and answers from paho's
    network thread, as firmware does; ``delay`` answers later (from a timer thread)."""

    def __init__(
        self,
        broker_url: str,
        device_id: str,
        answer: Answer = echo,
        *,
        delay: Callable[[], float] | None = None,
    ) -> None:
        self.device_id = device_id
        self.answer = answer
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.device = Device(broker_url, device_id)
        c = self.device.client
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            _root, _id, _methods, request_id, _req = msg.topic.split("/")
            body = orjson.loads(msg.payload)
            self.requests.append((request_id, body))
            reply = self.answer(request_id, body)
            if reply is None:
                return
            topic = f"devices/{device_id}/methods/{request_id}/res"
            if delay is None:
                c.publish(topic, reply, qos=1)
            else:
                threading.Timer(delay(), c.publish, (topic, reply), {"qos": 1}).start()

        c.on_message = on_message
        c.subscribe(f"devices/{device_id}/methods/+/req", qos=1)
        assert subscribed.wait(10), "the device's subscription was not acknowledged"

    def respond(self, request_id: str, payload: bytes) -> None:
        self.device.client.publish(
            f"devices/{self.device_id}/methods/{request_id}/res", payload, qos=1
        ).wait_for_publish(10)

    def close(self) -> None:
        self.device.close()


@pytest.fixture
def devices(broker: LocalMosquitto) -> Iterator[Callable[..., MethodDevice]]:
    made: list[MethodDevice] = []

    def make(device_id: str, answer: Answer = echo, **kwargs: Any) -> MethodDevice:
        made.append(MethodDevice(broker.url, device_id, answer, **kwargs))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


@pytest.fixture
async def online(db: asyncpg.Pool[Any]) -> Any:
    """Register a device and mark it online, as ingest does on its `online` status.
    Afterwards the devices are marked offline again: no other test (schemathesis follows
    device lists) may call a device that is gone and find it "online"."""
    marked: list[str] = []

    async def mark(device_id: str) -> str:
        await db.execute("INSERT INTO devices (id) VALUES ($1) ON CONFLICT DO NOTHING", device_id)
        await db.execute(
            "INSERT INTO device_activity (device_id, last_seen, online, status_changed_at) "
            "VALUES ($1, now(), true, now()) ON CONFLICT (device_id) DO UPDATE "
            "SET online = true, status_changed_at = now()",
            device_id,
        )
        marked.append(device_id)
        return device_id

    yield mark
    await db.execute("UPDATE device_activity SET online = false WHERE device_id = ANY($1)", marked)


def call(
    api: ApiProcess,
    token: str,
    device_id: str,
    name: str,
    *,
    params: dict[str, Any] | None = None,
    timeout_s: float = 5,
) -> httpx.Response:
    body: dict[str, Any] = {"timeout_s": timeout_s}
    if params is not None:
        body["params"] = params
    with client(api, token) as c:
        return c.post(f"/v1/devices/{device_id}/methods/{name}", json=body, timeout=timeout_s + 10)


async def acall(
    c: httpx.AsyncClient, device_id: str, name: str, params: dict[str, Any]
) -> httpx.Response:
    return await c.post(
        f"/v1/devices/{device_id}/methods/{name}", json={"params": params, "timeout_s": 10}
    )


async def test_round_trip_with_params_and_payload(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    online: Any,
    uid: str,
) -> None:
    device_id = await online(f"{uid}-d")

    def answer(_rid: str, body: dict[str, Any]) -> bytes:
        if body["method"] == "fail":
            return b'{"status": 500, "payload": {"error": "relay stuck"}}'
        return echo(_rid, body)

    dev = devices(device_id, answer)
    token = await make_key("commands:write")
    calls_before = api.metric("fleetline_api_method_call_seconds_count")
    params = {"on": True, "level": 3, "note": "ünïcode", "nested": {"a": [1, 2.5, None]}}
    resp = call(api, token, device_id, "switch.set_v2", params=params)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert re.fullmatch(r"[0-9a-f]{32}", result["request_id"])
    assert result["status"] == 200
    assert result["payload"] == {"method": "switch.set_v2", **params}
    # The request as docs/protocol.md has it (and as the rules service sends its commands).
    assert dev.requests == [(result["request_id"], {"method": "switch.set_v2", "params": params})]

    # The device's own status comes back as it gave it; the HTTP call itself succeeded.
    failed = call(api, token, device_id, "fail")
    assert failed.status_code == 200
    assert failed.json()["status"] == 500 and failed.json()["payload"] == {"error": "relay stuck"}
    assert dev.requests[-1][1] == {"method": "fail", "params": {}}  # params default to {}
    assert api.metric("fleetline_api_method_call_seconds_count") == calls_before + 2

    # The scope: commands:write (or admin).
    reader = await make_key("devices:read", "devices:write", "telemetry:read")
    assert_problem(call(api, reader, device_id, "switch"), 403, "commands:write")
    assert call(api, await make_key("admin"), device_id, "switch").status_code == 200


async def test_a_device_that_does_not_answer_gets_504_and_late_answers_are_ignored(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    online: Any,
    uid: str,
) -> None:
    device_id = await online(f"{uid}-d")
    silent = True
    dev = devices(device_id, lambda rid, body: None if silent else echo(rid, body))
    token = await make_key("commands:write")
    started = time.monotonic()
    resp = call(api, token, device_id, "reboot", timeout_s=1)
    elapsed = time.monotonic() - started
    body = assert_problem(resp, 504, "did not answer reboot within 1 s")
    assert 0.9 < elapsed < 5, elapsed
    [(request_id, _)] = dev.requests
    assert request_id in body["detail"]
    # The answer arrives after the call gave up: nobody waits for it, and it breaks nothing.
    dev.respond(request_id, b'{"status": 200, "payload": {}}')
    dev.respond("0" * 32, b'{"status": 200}')  # a request id nobody ever used
    silent = False
    again = call(api, token, device_id, "reboot")
    assert again.status_code == 200 and again.json()["request_id"] != request_id


async def test_an_offline_device_gets_409_and_an_unknown_one_404(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    start_ingest: Callable[..., IngestProcess],
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    """Online and offline as ingest records them from the device's status topic."""
    start_ingest()
    device_id = f"{uid}-d"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    token = await make_key("commands:write")
    # Registered, never connected.
    assert_problem(call(api, token, device_id, "ping"), 409, "offline")
    dev = devices(device_id)

    async def status_is(expected: bool) -> None:
        deadline = time.monotonic() + 20
        while (
            await db.fetchval("SELECT online FROM device_status WHERE device_id = $1", device_id)
            is not expected
        ):
            assert time.monotonic() < deadline, f"status never became {expected}"
            await asyncio.sleep(0.1)

    try:
        dev.device.publish(b"online", kind="status").wait_for_publish(10)
        await status_is(True)
        assert call(api, token, device_id, "ping").status_code == 200
        dev.device.publish(b"offline", kind="status").wait_for_publish(10)
        await status_is(False)
        assert_problem(call(api, token, device_id, "ping"), 409, f"device {device_id} is offline")
        assert len(dev.requests) == 1  # nothing was sent to the offline device
    finally:
        await db.execute(
            "UPDATE device_activity SET online = false WHERE device_id = $1", device_id
        )
    assert_problem(call(api, token, f"{uid}-nobody", "ping"), 404, "not found")


async def test_invalid_calls_are_422_and_params_with_nul_400(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    online: Any,
    uid: str,
) -> None:
    device_id = await online(f"{uid}-d")
    dev = devices(device_id)
    path = f"/v1/devices/{device_id}/methods"
    with client(api, await make_key("commands:write")) as c:
        # A NUL character: refused as a method job refuses it (jsonb cannot hold it).
        nul = c.post(f"{path}/m", json={"params": {"x": ["ok", "a\u0000b"]}})
        assert_problem(nul, 400, "params.x[1] contains a NUL character")
        nul_name = c.post(f"{path}/m", json={"params": {"x": {"a\u0000": 1}}})
        assert_problem(nul_name, 400, "a member name in params.x contains a NUL character")
        assert dev.requests == []
        # The six characters \u0000 are text like any other.
        assert c.post(f"{path}/m", json={"params": {"x": "a\\u0000b"}}).status_code == 200
        for name in ("bad name", "a" * 65, ".hidden", "-%C3%A9"):
            assert_problem(c.post(f"{path}/{name}", json={}), 422)
        for body in (
            {"timeout_s": 0},
            {"timeout_s": 301},
            {"params": []},
            {"timeout": 5},
            {"params": {"x": "y" * 8200}},
            {"params": {"x": 1}, "extra": 1},
        ):
            assert_problem(c.post(f"{path}/m", json=body), 422)
        assert_problem(
            c.post(
                f"{path}/m",
                content=b'{"params": {"x": NaN}}',
                headers={"content-type": "application/json"},
            ),
            422,
        )


async def test_a_malformed_answer_is_502(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    online: Any,
    uid: str,
) -> None:
    device_id = await online(f"{uid}-d")
    answers = {
        "text": b"not json",
        "binary": b"\xff\xfe\x00",
        "list": b"[1, 2]",
        "string_status": b'{"status": "200", "payload": {}}',
        "no_status": b'{"payload": {}}',
        "nan": b'{"status": 200, "payload": NaN}',
        "surrogate": b'{"status": 200, "payload": "\\ud800"}',
        # What jsonb (where a method job keeps answers) cannot hold: a NUL in a string or
        # a member name (was a 200); a number beyond a double (was a 200 with null).
        "nul": b'{"status": 200, "payload": "a\\u0000b"}',
        "nul_name": b'{"status": 200, "payload": {"a\\u0000": 1}}',
        "huge": b'{"status": 200, "payload": {"x": [1e400]}}',
        "minus_huge": b'{"status": 200, "payload": -1e999}',
        "empty": b"",
        # Nested deeper than the API can encode back (was a 500).
        "deep": b'{"status": 200, "payload": ' + b"[" * 300 + b"]" * 300 + b"}",
    }
    devices(device_id, lambda rid, body: answers.get(body["method"], echo(rid, body)))
    token = await make_key("commands:write")
    for method in answers:
        assert_problem(
            call(api, token, device_id, method), 502, "device answered with a malformed response"
        )
    ok = call(api, token, device_id, "fine")
    assert ok.status_code == 200 and ok.json()["payload"] == {"method": "fine"}


async def test_ten_concurrent_calls_each_get_their_own_answer(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    online: Any,
    uid: str,
) -> None:
    ids = [await online(f"{uid}-{i}") for i in range(2)]
    rng = random.Random(5)
    for device_id in ids:  # answers come back in another order than the requests went out
        devices(device_id, delay=lambda: rng.uniform(0.0, 0.5))
    token = await make_key("commands:write")
    async with httpx.AsyncClient(
        base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
    ) as c:
        responses = await asyncio.gather(
            *(acall(c, ids[n % 2], "count", {"n": n}) for n in range(10))
        )
    for n, resp in enumerate(responses):
        assert resp.status_code == 200, resp.text
        assert resp.json()["payload"] == {"method": "count", "n": n}
    assert len({r.json()["request_id"] for r in responses}) == 10


async def test_calls_through_either_api_replica_get_their_answer(
    api: ApiProcess,
    make_key: Callable[..., Any],
    devices: Callable[..., MethodDevice],
    online: Any,
    database_url: str,
    broker: LocalMosquitto,
    artifacts: Path,
    uid: str,
) -> None:
    """Both replicas see every response; each call is answered on the replica waiting."""
    device_id = await online(f"{uid}-d")
    rng = random.Random(7)
    devices(device_id, delay=lambda: rng.uniform(0.0, 0.3))
    second = ApiProcess(
        database_url=database_url, mqtt_url=broker.url, log_dir=artifacts, name=f"{uid}-replica"
    )
    second.start()
    try:
        token = await make_key("commands:write")
        for replica in (api, second):
            resp = call(
                api=replica,
                token=token,
                device_id=device_id,
                name="where",
                params={"via": replica.port},
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["payload"] == {"method": "where", "via": replica.port}
        # Concurrently through both: each answer reaches the replica that waits for it.
        clients = [
            httpx.AsyncClient(
                base_url=r.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
            )
            for r in (api, second)
        ]
        try:
            responses = await asyncio.gather(
                *(acall(clients[n % 2], device_id, "count", {"n": n}) for n in range(10))
            )
        finally:
            for c in clients:
                await c.aclose()
        assert [r.json()["payload"]["n"] for r in responses] == list(range(10))
        # The replica that did not wait for an answer ignored it.
        assert second.metric("fleetline_api_method_calls_total") == 1 + 5
    finally:
        second.stop()


async def test_broker_link_bounds_pending_calls_and_survives_bad_messages(
    broker: LocalMosquitto, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BrokerLink in this process: the bound on calls in flight, cleanup after timeouts,
    and messages that answer nothing (bad topics, bad JSON, unknown ids) are ignored."""
    monkeypatch.setenv("FLEETLINE_MQTT_URL", broker.url)
    monkeypatch.setenv("FLEETLINE_DEVICE_KEY_SECRET", DEVICE_KEY_SECRET)
    link = BrokerLink(ApiSettings(), max_pending_calls=2)
    with pytest.raises(BrokerUnavailableError):
        await link.call(f"{uid}-d", "r0", b"{}", timeout_seconds=1)
    runner = asyncio.create_task(link.run(), name="test.broker_link")
    try:
        while not link.connected:
            await asyncio.sleep(0.05)
        dev = Device(broker.url, f"{uid}-d")
        try:
            for topic, payload in [
                (f"devices/{uid}-d/methods/early/res", b"\xff not json"),
                (f"devices/{uid}-d/methods/res", b"{}"),
                (f"devices/{uid}-d/methods/unknown/res", b'{"status": 200}'),
            ]:
                dev.client.publish(topic, payload, qos=1).wait_for_publish(5)
            waiting = [
                asyncio.create_task(link.call(f"{uid}-d", f"r{i}", b"{}", timeout_seconds=0.5))
                for i in (1, 2)
            ]
            await asyncio.sleep(0.05)
            assert link.pending_calls == 2
            with pytest.raises(TooManyCallsError):
                await link.call(f"{uid}-d", "r3", b"{}", timeout_seconds=1)
            # Another device answering with someone else's request id is not taken.
            other = Device(broker.url, f"{uid}-other")
            other.client.publish(
                f"devices/{uid}-other/methods/r1/res", b"{}", qos=1
            ).wait_for_publish(5)
            other.close()
            dev.client.publish(f"devices/{uid}-d/methods/r2/res", b"answer", qos=1)
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert isinstance(results[0], MethodTimeoutError)
            assert results[1] == b"answer"
            assert link.pending_calls == 0
            assert not runner.done() and link.connected
        finally:
            dev.close()
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    wait_until(lambda: not link.connected, what="link down")
