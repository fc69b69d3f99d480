"""Gateways (docs/gateways.md) on a whole backend of their own: the broker with the auth
plugin, ingest and the API. A gateway is a real (paho, MQTT 5) client logged in with its
own key, publishing and subscribing on its children's topics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from websockets.asyncio.client import connect

from fleetline_dev.certs import TlsFiles
from tests.e2e.test_routes_e2e import routes_env
from tests.integration.test_api import assert_problem
from tests.integration.test_cli import fleetline
from tests.integration.test_jobs import method_job, wait_job
from tests.integration.test_rules import Receiver, threshold_rule
from tests.integration.test_stream import next_events, subscribed, ws_url
from tests.stack import RULES_USER, Backend, serve_stack, service_url
from tests.support import RulesProcess, wait_until

pytestmark = pytest.mark.integration

GRANTED = 0
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
async def stack(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "gateways") as served:
        yield served


@pytest.fixture
def rest(stack: Backend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=30,
                      headers={"Authorization": f"Bearer {stack.key}"}) as c:
        yield c


# What a gateway subscribes to for each child it serves.
SERVED = ("methods/+/req", "c2d", "twin/desired")


class Gateway:
    """A gateway's connection (MQTT 5: a refused publish is answered PUBACK 0x87), with
    its Last Will. It answers every method call for a child with what it was asked, and
    completes every cloud-to-device message."""

    def __init__(self, stack: Backend, gateway_id: str, key: str) -> None:
        self.id = gateway_id
        self.messages: list[tuple[str, bytes]] = []
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        self._done = threading.Condition()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=gateway_id,
                                      protocol=mqtt.MQTTv5)
        c.username_pw_set(gateway_id, key)
        c.will_set(f"devices/{gateway_id}/status", b"offline", qos=1, retain=True)
        connected = threading.Event()
        c.on_connect = lambda *_a: connected.set()
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.connect("127.0.0.1", stack.broker.port)
        c.loop_start()
        assert connected.wait(10), f"gateway {gateway_id} could not connect"
        assert self.publish(f"devices/{gateway_id}/status", b"online", retain=True) == GRANTED

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._done:
            self._acks[mid] = reason.value
            self._done.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._done:
            self._subacks[mid] = [r.value for r in reasons]
            self._done.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.append((msg.topic, msg.payload))
        parts = msg.topic.split("/")
        if len(parts) in (5, 7) and parts[-3] == "methods" and parts[-1] == "req":
            call = orjson.loads(msg.payload)
            answer = {"status": 200, "payload": {"child": parts[1], "via": self.id, **call}}
            self.client.publish("/".join([*parts[:-1], "res"]), orjson.dumps(answer), qos=1)
        elif len(parts) == 3 and parts[2] == "c2d":
            ack = {"id": orjson.loads(msg.payload)["id"], "outcome": "complete"}
            self.client.publish(f"devices/{parts[1]}/c2d/ack", orjson.dumps(ack), qos=1)

    def _wait(self, table: dict[int, Any], mid: int) -> Any:
        with self._done:
            assert self._done.wait_for(lambda: mid in table, 10), f"no answer to {mid}"
            return table.pop(mid)

    def publish(self, topic: str, payload: bytes | Any, *, retain: bool = False) -> int:
        """The broker's PUBACK reason code."""
        raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return int(self._wait(self._acks, self.client.publish(topic, raw, qos=1,
                                                              retain=retain).mid))

    def subscribe(self, *filters: str) -> list[int]:
        _rc, mid = self.client.subscribe([(f, 1) for f in filters])
        return list(self._wait(self._subacks, mid))

    def serve(self, child: str) -> None:
        """Subscribe to what the cloud sends the child."""
        codes = self.subscribe(*(f"devices/{child}/{k}" for k in SERVED))
        assert codes == [1, 1, 1], codes

    def received(self, topic: str) -> list[bytes]:
        return [p for t, p in self.messages if t == topic]

    def cut(self) -> None:
        """The connection dropped without a goodbye: the broker publishes the Will."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()

    def close(self) -> None:
        props = Properties(mqtt.PacketTypes.DISCONNECT)
        self.client.disconnect(properties=props)
        self.client.loop_stop()


def make_gateway(rest: httpx.Client, gateway_id: str, **policy: Any) -> str:
    """Register a gateway; its key."""
    created = rest.post("/v1/devices", json={"id": gateway_id, "gateway": policy})
    assert created.status_code == 201, created.text
    assert created.json()["gateway"] == {"create_children": False, "child_id_pattern": ".*",
                                         "child_tags": {}, "max_children": 1000, **policy}
    return str(created.json()["credentials"]["key"])


def reading(ts_ms: int, **values: Any) -> dict[str, Any]:
    return {"ts": ts_ms, "values": values}


def device(rest: httpx.Client, device_id: str) -> dict[str, Any]:
    got = rest.get(f"/v1/devices/{device_id}")
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def points(rest: httpx.Client, device_id: str, metric: str) -> list[tuple[str, float]]:
    got = rest.get(f"/v1/devices/{device_id}/telemetry", params={"metric": metric})
    assert got.status_code == 200, got.text
    return [(p["ts"], p["value"]) for p in got.json()["items"]]


async def test_a_gateway_carries_its_childrens_readings_twins_methods_and_messages(
    stack: Backend, rest: httpx.Client, uid: str
) -> None:
    gw_id, made, meter = f"{uid}-gw", f"{uid}-ble-1", f"{uid}-meter"
    key = make_gateway(rest, gw_id, create_children=True, child_id_pattern=f"{uid}-ble-[0-9]+",
                       child_tags={"kind": "ble", "site": "north"})
    # A child registered by hand, without a key of its own: it speaks only through gw.
    by_hand = rest.post("/v1/devices", json={"id": meter, "parent": gw_id, "issue_key": False})
    assert by_hand.status_code == 201, by_hand.text
    assert by_hand.json()["credentials"] is None and by_hand.json()["parent"] == gw_id
    gw = Gateway(stack, gw_id, key)
    try:
        gw.serve(meter)
        gw.serve(made)  # an id the registry does not know: its first message creates it
        child = device(rest, made)
        assert (child["parent"], child["tags"], child["key_version"], child["gateway"]) == (
            gw_id, {"kind": "ble", "site": "north"}, 0, None)
        now = int(time.time() * 1000)
        for c in (made, meter):
            assert gw.publish(f"devices/{c}/status", b"online", retain=True) == GRANTED
        batch = [reading(now - 2000, temperature=20.5), reading(now - 1000, temperature=21.0)]
        assert gw.publish(f"devices/{made}/telemetry", batch) == GRANTED
        assert gw.publish(f"devices/{meter}/telemetry", reading(now, energy=7)) == GRANTED
        # A module of the child publishes its own readings: a series named module/metric.
        assert gw.publish(f"devices/{meter}/modules/env/telemetry",
                          reading(now, temperature=4.5)) == GRANTED
        assert gw.publish(f"devices/{made}/twin/reported", {"rssi": -61}) == GRANTED
        wait_until(lambda: len(points(rest, made, "temperature")) == 2, what="child readings")
        assert [v for _, v in points(rest, made, "temperature")] == [20.5, 21.0]
        wait_until(lambda: points(rest, meter, "env/temperature"), what="module readings")
        assert [v for _, v in points(rest, meter, "env/temperature")] == [4.5]
        latest = rest.get(f"/v1/devices/{meter}/latest").json()["metrics"]
        assert sorted(latest) == ["energy", "env/temperature"]
        assert device(rest, made)["online"] and device(rest, meter)["online"]
        wait_until(lambda: rest.get(f"/v1/devices/{made}/twin").json()["reported"]
                   == {"rssi": -61}, what="the child's reported twin")

        # The registry, the query language and the device list know the family.
        children = rest.get("/v1/devices", params={"parent": gw_id}).json()["items"]
        assert [d["id"] for d in children] == [made, meter]
        found = rest.post("/v1/query", json={"query": f"parent = '{gw_id}'"}).json()
        assert [d["device_id"] for d in found["items"]] == [made, meter]
        gateways = rest.post("/v1/query", json={"query": f"gateway = true AND id = '{gw_id}'"})
        assert [d["device_id"] for d in gateways.json()["items"]] == [gw_id]

        # The cloud's side reaches the child through the gateway.
        patched = rest.patch(f"/v1/devices/{made}/twin", json={"interval_s": 30})
        assert patched.status_code == 200, patched.text
        wait_until(lambda: gw.received(f"devices/{made}/twin/desired"), what="desired twin")
        desired = orjson.loads(gw.received(f"devices/{made}/twin/desired")[-1])
        assert desired["desired"] == {"interval_s": 30}
        called = rest.post(f"/v1/devices/{made}/methods/identify",
                           json={"params": {"blink": 3}, "timeout_s": 10})
        assert called.status_code == 200, called.text
        assert called.json()["payload"] == {"child": made, "via": gw_id, "method": "identify",
                                            "params": {"blink": 3}}
        # A module of the child: its twin and methods travel through the gateway too.
        assert rest.put(f"/v1/devices/{meter}/modules/env", json={}).status_code in (200, 201)
        module = f"devices/{meter}/modules/env"
        assert gw.subscribe(f"{module}/twin/desired", f"{module}/methods/+/req") == [1, 1]
        assert gw.publish(f"{module}/twin/reported", {"fan": "auto"}) == GRANTED
        wait_until(lambda: rest.get(f"/v1/devices/{meter}/modules/env/twin").json()["reported"]
                   == {"fan": "auto"}, what="the module's reported twin")
        patched = rest.patch(f"/v1/devices/{meter}/modules/env/twin", json={"fan": "on"})
        assert patched.status_code == 200, patched.text
        wait_until(lambda: gw.received(f"{module}/twin/desired"), what="the module's desired")
        assert orjson.loads(gw.received(f"{module}/twin/desired")[-1])["desired"] == {"fan": "on"}
        called = rest.post(f"/v1/devices/{meter}/modules/env/methods/calibrate",
                           json={"params": {}, "timeout_s": 10})
        assert called.status_code == 200, called.text
        assert called.json()["payload"]["child"] == meter
        sent = rest.post(f"/v1/devices/{meter}/messages", json={"body": {"reset": True}})
        assert sent.status_code == 201, sent.text
        message = f"/v1/devices/{meter}/messages/{sent.json()['id']}"
        wait_until(lambda: rest.get(message).json()["state"] == "completed", what="c2d ack")
        # A job over the gateway's children, by the query language.
        job = rest.post("/v1/jobs", json=method_job(f"parent = '{gw_id}'", "ping"))
        assert job.status_code == 201, job.text
        done = wait_job(rest, job.json()["id"])
        assert done["progress"]["succeeded"] == 2 and done["state"] == "completed", done
    finally:
        gw.close()


async def test_rules_routes_and_offline_alarms_treat_children_and_modules_like_any_device(
    stack: Backend, rest: httpx.Client, uid: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A rules process on the stack: a rule matching the tags the gateway's policy gives
    its children raises on a child's readings; a route whose query is ``parent = gw``
    forwards a child's module readings and not those of a device of its own with the
    same tags; the gateway saying goodbye takes its children offline, which raises
    their offline alarm at once (the rules service reads the status ingest stores)."""
    gw_id, child, plain = f"{uid}-gw", f"{uid}-t1", f"{uid}-own"
    site = {"site": uid}
    key = make_gateway(rest, gw_id, create_children=True, child_id_pattern=f"{uid}-t[0-9]+",
                       child_tags=site)
    own = rest.post("/v1/devices", json={"id": plain, "tags": site})
    assert own.status_code == 201, own.text
    receiver = Receiver()
    rules = RulesProcess(database_url=stack.database_url,
                         mqtt_url=service_url(stack.broker, RULES_USER),
                         log_dir=tmp_path_factory.mktemp("gateway-rules"), name=uid,
                         env=routes_env(uid))
    rules.start()
    gw = Gateway(stack, gw_id, key)
    direct = Gateway(stack, plain, own.json()["credentials"]["key"])  # a device on its own
    try:
        hot = threshold_rule(f"{uid} hot", []) | {"match": {"tags": site},
                                                 "raise": {"op": ">", "value": 30, "for_s": 0}}
        silent = {"name": f"{uid} silent", "kind": "no_data", "timeout_s": 300,
                  "match": {"tags": site}, "message": "{device_id} went away"}
        route = {"name": f"{uid} children's env", "query": f"parent = '{gw_id}'",
                 "metric": "env/temp", "destination": {"type": "webhook",
                                                       "url": f"{receiver.url}/{uid}"}}
        for path, body in (("/v1/rules", hot), ("/v1/rules", silent), ("/v1/routes", route)):
            made = rest.post(path, json=body)
            assert made.status_code == 201, made.text
        route_id = made.json()["id"]
        gw.serve(child)  # its first subscription creates it, with the policy's tags
        wait_until(lambda: rules.metric("fleetline_rules_loaded") == 2
                   and rules.metric("fleetline_rules_routed_devices") == 1,
                   what="the rules service to take the rules, and the child into the route")

        assert gw.publish(f"devices/{child}/status", b"online", retain=True) == GRANTED
        now = int(time.time() * 1000)
        assert gw.publish(f"devices/{child}/telemetry", reading(now, temp=35)) == GRANTED
        # The device of its own first: the rules service takes messages in the broker's
        # order, so once the child's reading is routed, the other one has been judged.
        for source, device_id, ts in ((direct, plain, now + 1), (gw, child, now + 2)):
            assert source.publish(f"devices/{device_id}/modules/env/telemetry",
                                  reading(ts, temp=12.5)) == GRANTED

        def alarms(state: str) -> list[dict[str, Any]]:
            got = rest.get("/v1/alarms", params={"device_id": child, "state": state})
            assert got.status_code == 200, got.text
            return list(got.json()["items"])

        wait_until(lambda: alarms("active"), what="the child's alarm")
        [raised] = alarms("active")
        assert (raised["metric"], raised["value"]) == ("temp", 35), raised
        wait_until(lambda: receiver.on(f"/{uid}"), what="the routed module reading")
        deliveries = rest.get(f"/v1/routes/{route_id}/deliveries").json()["items"]
        assert [d["device_id"] for d in deliveries] == [child], deliveries
        [hook] = receiver.on(f"/{uid}")
        body = json.loads(hook["body"])
        assert (body["device_id"], body["values"]) == (child, {"env/temp": 12.5}), body

        gw.publish(f"devices/{gw_id}/status", b"offline", retain=True)  # a goodbye
        gw.close()
        wait_until(lambda: device(rest, child)["offline_reason"] == f"gateway '{gw_id}' offline",
                   what="the child offline with its gateway")
        wait_until(lambda: any(a["rule_name"] == f"{uid} silent" for a in alarms("active")),
                   timeout=10, what="the child's offline alarm, long before 300 s")
        assert device(rest, plain)["online"]  # not its child: not taken along
    finally:
        direct.close()
        rules.stop()
        receiver.close()


async def test_a_gateway_is_refused_devices_that_are_not_its_children_with_the_reason(
    stack: Backend, rest: httpx.Client, uid: str
) -> None:
    gw_a, gw_b, solo = f"{uid}-gwa", f"{uid}-gwb", f"{uid}-solo"
    theirs, outside, strict = f"{uid}-b1", f"{uid}-x1", f"{uid}-gwc"
    key_a = make_gateway(rest, gw_a, create_children=True, child_id_pattern=f"{uid}-a[0-9]+")
    make_gateway(rest, gw_b)
    key_c = make_gateway(rest, strict)  # creates no children
    assert rest.post("/v1/devices", json={"id": solo}).status_code == 201
    assert rest.post("/v1/devices", json={"id": theirs, "parent": gw_b}).status_code == 201
    a, c = Gateway(stack, gw_a, key_a), Gateway(stack, strict, key_c)
    try:
        now = int(time.time() * 1000)
        for target in (solo, theirs, outside):
            assert a.publish(f"devices/{target}/telemetry", reading(now, t=1)) == NOT_AUTHORIZED
        assert c.publish(f"devices/{uid}-c1/telemetry", reading(now, t=1)) == NOT_AUTHORIZED
        # Subscriptions too; a wildcard for "any device" is never a child.
        assert a.subscribe(f"devices/{solo}/c2d", "devices/+/c2d") == [NOT_AUTHORIZED] * 2
        # What the services write stays theirs on a child's topics as on the gateway's own.
        assert a.publish(f"devices/{uid}-a1/c2d", b"{}") == NOT_AUTHORIZED
        assert a.publish(f"devices/{uid}-a1/telemetry", reading(now, t=1), retain=True) \
            == NOT_AUTHORIZED
        assert a.publish(f"devices/{uid}-a1/telemetry", reading(now, t=2)) == GRANTED

        def refusals(gateway: str) -> dict[str, dict[str, Any]]:
            got = rest.get(f"/v1/devices/{gateway}/refusals")
            assert got.status_code == 200, got.text
            return {r["child_id"]: r for r in got.json()}

        wait_until(lambda: len(refusals(gw_a)) == 4 and refusals(strict), timeout=30,
                   what="the refusals recorded")
        got = refusals(gw_a)
        assert got[solo]["reason"] == f"'{solo}' is not a child of '{gw_a}'"
        assert got[solo]["count"] == 2 and got[solo]["topic"] == f"devices/{solo}/c2d"
        assert got[theirs]["reason"] == f"'{theirs}' is a child of '{gw_b}'"
        assert got[outside]["reason"] == f"'{outside}' is outside the child id pattern of '{gw_a}'"
        assert got["+"]["reason"] == "'+' is not a valid device id"
        assert refusals(strict)[f"{uid}-c1"]["reason"] == f"'{uid}-c1' is not a child of '{strict}'"
        assert refusals(gw_b) == {}
        # Nothing refused was stored or created; the one allowed reading was.
        for refused in (outside, f"{uid}-c1"):
            assert rest.get(f"/v1/devices/{refused}").status_code == 404
        wait_until(lambda: [v for _, v in points(rest, f"{uid}-a1", "t")] == [2.0],
                   what="the allowed reading")
        for target in (solo, theirs):
            assert points(rest, target, "t") == []
        assert_problem(rest.get(f"/v1/devices/{uid}-nobody/refusals"), 404, "not found")
    finally:
        a.close()
        c.close()


async def test_children_go_offline_with_their_gateway_and_move_to_another_at_once(
    stack: Backend, rest: httpx.Client, uid: str
) -> None:
    one, two, child = f"{uid}-gw1", f"{uid}-gw2", f"{uid}-c"
    key_one = make_gateway(rest, one, create_children=True, child_id_pattern=f"{uid}-c")
    key_two = make_gateway(rest, two)
    gw1, gw2 = Gateway(stack, one, key_one), Gateway(stack, two, key_two)
    try:
        assert gw1.publish(f"devices/{child}/status", b"online", retain=True) == GRANTED
        wait_until(lambda: device(rest, child)["online"], what="the child online")
        headers = {"Authorization": f"Bearer {stack.key}"}
        async with connect(ws_url(stack.api, device=child), additional_headers=headers) as ws:
            await subscribed(ws)
            gw1.cut()  # no goodbye: the broker publishes the gateway's Will
            [event] = await next_events(ws, 1)  # the live stream tells it too
        assert (event["type"], event["device_id"], event["online"]) == ("status", child, False)
        assert device(rest, child)["online"] is False
        assert device(rest, child)["offline_reason"] == f"gateway '{one}' offline"
        assert device(rest, one)["offline_reason"] is None
        env = {"FLEETLINE_API_URL": stack.api.url, "FLEETLINE_API_KEY": stack.key}
        shown = fleetline("device", "show", child, env=env)
        assert f"offline: gateway '{one}' offline" in shown.stdout, shown
        gw1 = Gateway(stack, one, key_one)
        gw1.serve(child)
        assert gw1.publish(f"devices/{child}/status", b"online", retain=True) == GRANTED
        wait_until(lambda: device(rest, child)["online"], what="the child back")
        assert device(rest, child)["offline_reason"] is None

        assert gw2.subscribe(f"devices/{child}/c2d") == [NOT_AUTHORIZED]  # not its child yet
        moved = rest.patch(f"/v1/devices/{child}", json={"parent": two})
        assert moved.status_code == 200 and moved.json()["parent"] == two, moved.text
        # The broker learns of the move from the database's notification (milliseconds
        # after the commit; here the first subscription after the answer is granted): the
        # new gateway may serve the child from then on...
        wait_until(lambda: gw2.subscribe(*(f"devices/{child}/{k}" for k in SERVED)) == [1] * 3,
                   timeout=5, what="the broker to take the move")
        # ...and the old one is refused from then on.
        now = int(time.time() * 1000)
        assert gw1.publish(f"devices/{child}/telemetry", reading(now, v=1)) == NOT_AUTHORIZED
        assert gw2.publish(f"devices/{child}/telemetry", reading(now, v=2)) == GRANTED
        sent = rest.post(f"/v1/devices/{child}/messages", json={"body": "hello"})
        message = f"/v1/devices/{child}/messages/{sent.json()['id']}"
        wait_until(lambda: rest.get(message).json()["state"] == "completed", what="c2d ack")
        assert gw2.received(f"devices/{child}/c2d")
        assert not gw1.received(f"devices/{child}/c2d")  # its old subscription delivers nothing
        wait_until(lambda: points(rest, child, "v"), what="the new gateway's reading")
        assert [v for _, v in points(rest, child, "v")] == [2.0]
    finally:
        gw1.close()
        gw2.close()


async def test_the_registry_keeps_gateways_one_level_deep(rest: httpx.Client, uid: str) -> None:
    gw, plain, child = f"{uid}-gw", f"{uid}-plain", f"{uid}-child"
    make_gateway(rest, gw)
    assert rest.post("/v1/devices", json={"id": plain}).status_code == 201
    assert rest.post("/v1/devices", json={"id": child, "parent": gw}).status_code == 201
    cases = [
        (rest.post("/v1/devices", json={"id": f"{uid}-x", "parent": plain}), 409,
         "is not a gateway"),
        (rest.post("/v1/devices", json={"id": f"{uid}-x", "parent": f"{uid}-none"}), 400,
         "is not registered"),
        (rest.post("/v1/devices", json={"id": f"{uid}-x", "parent": gw, "gateway": {}}), 400,
         "cannot be behind another gateway"),
        (rest.post("/v1/devices", json={"id": f"{uid}-x",
                                        "gateway": {"child_id_pattern": "(unclosed"}}),
         400, "child_id_pattern cannot be used"),
        (rest.patch(f"/v1/devices/{gw}", json={"gateway": None}), 409, "has children"),
        (rest.patch(f"/v1/devices/{gw}", json={"parent": gw}), 400, "cannot be behind"),
        (rest.patch(f"/v1/devices/{child}", json={"parent": child}), 400, "its own parent"),
        (rest.patch(f"/v1/devices/{child}", json={"gateway": {}}), 400, "cannot be behind"),
        (rest.post("/v1/query", json={"query": "gateway = 'yes'"}), 400, "true or false"),
        # A gateway whose key leaks must not claim any id nobody registered yet.
        (rest.patch(f"/v1/devices/{gw}", json={"gateway": {"create_children": True}}), 400,
         "create_children needs a child_id_pattern"),
        (rest.patch(f"/v1/devices/{gw}", json={"gateway": {"max_children": 0}}), 422,
         "greater than or equal to 1"),
    ]
    for response, status, detail in cases:
        body = assert_problem(response, status)
        assert detail in orjson.dumps(body).decode(), body
    assert rest.get(f"/v1/devices/{f'{uid}-x'}").status_code == 404
    # Moved out, the gateway may stop being one; deleting a gateway frees its children.
    assert rest.patch(f"/v1/devices/{child}", json={"parent": None}).json()["parent"] is None
    assert rest.patch(f"/v1/devices/{gw}", json={"gateway": None}).json()["gateway"] is None
    assert rest.patch(f"/v1/devices/{gw}", json={"gateway": {"max_children": 5}}
                      ).status_code == 200
    assert rest.patch(f"/v1/devices/{child}", json={"parent": gw}).json()["parent"] == gw
    assert rest.delete(f"/v1/devices/{gw}").status_code == 204
    assert device(rest, child)["parent"] is None


async def test_the_command_line_makes_gateways_moves_children_and_lists_refusals(
    stack: Backend, rest: httpx.Client, uid: str
) -> None:
    env = {"FLEETLINE_API_URL": stack.api.url, "FLEETLINE_API_KEY": stack.key}
    gw, other, child = f"{uid}-gw", f"{uid}-gw2", f"{uid}-c"

    def run(*args: str) -> str:
        done = fleetline(*args, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    made = run("device", "create", gw, "--gateway", "--create-children", "--child-pattern",
               f"{uid}-c.*", "--child-tag", "kind=ble")
    assert f"gateway: creates children matching '{uid}-c.*', tagged kind=ble" in made
    assert "key (version" in made
    run("device", "create", other, "--gateway")
    made = run("device", "create", child, "--parent", gw, "--no-key")
    assert f"behind gateway {gw}" in made and "no key issued" in made
    listed = run("device", "list", "--parent", gw)
    assert child in listed and other not in listed
    found = json.loads(run("device", "query", f"parent = '{gw}'", "-o", "json"))
    assert [d["device_id"] for d in found] == [child], found
    assert f"behind gateway {other}" in run("device", "update", child, "--parent", other)
    assert device(rest, child)["parent"] == other
    run("device", "update", child, "--no-parent")
    assert "gateway:" not in run("device", "update", gw, "--not-gateway")
    refused = fleetline("device", "update", child, "--parent", gw, env=env)
    assert refused.returncode != 0 and "is not a gateway" in refused.stderr
    assert json.loads(run("device", "refusals", other, "--json")) == []  # nothing refused


async def test_disabled_deleted_and_surplus_children_and_devices_that_are_no_gateway(
    stack: Backend, rest: httpx.Client, uid: str
) -> None:
    gw_id, plain_id = f"{uid}-gw", f"{uid}-plain"
    k1, k2, k3 = (f"{uid}-k{i}" for i in (1, 2, 3))
    key = make_gateway(rest, gw_id, create_children=True, child_id_pattern=f"{uid}-k[0-9]+",
                       max_children=2)
    plain = rest.post("/v1/devices", json={"id": plain_id})
    gw = Gateway(stack, gw_id, key)
    other = Gateway(stack, plain_id, plain.json()["credentials"]["key"])
    now = int(time.time() * 1000)
    try:
        gw.serve(k1)
        # A disabled child is refused through its gateway as it would be on its own.
        assert rest.patch(f"/v1/devices/{k1}", json={"enabled": False}).status_code == 200
        assert gw.publish(f"devices/{k1}/telemetry", reading(now, t=1)) == NOT_AUTHORIZED
        assert rest.patch(f"/v1/devices/{k1}", json={"enabled": True}).status_code == 200
        assert gw.publish(f"devices/{k1}/telemetry", reading(now, t=2)) == GRANTED
        # Two children at most; a third id inside the pattern is refused.
        gw.serve(k2)
        assert gw.publish(f"devices/{k3}/telemetry", reading(now, t=3)) == NOT_AUTHORIZED
        # Deleting a child it subscribes for: the API clears the child's retained twin, a
        # message on the gateway's subscription whose delivery the broker checks; a
        # delivery never creates a child again (it did within 2 s when it could).
        assert rest.delete(f"/v1/devices/{k2}").status_code == 204
        time.sleep(2)
        assert rest.get(f"/v1/devices/{k2}").status_code == 404
        # Not its child any more: at most the clearing itself reached it (the broker learns
        # of the deletion from the database's notification, milliseconds after the commit
        # the clearing follows), nothing with content.
        assert set(gw.received(f"devices/{k2}/twin/desired")) <= {b""}
        # A device that is not a gateway is refused another's topics at once, as before
        # gateways (the registry is not asked, nothing recorded).
        assert other.publish(f"devices/{k1}/telemetry", reading(now, t=4)) == NOT_AUTHORIZED

        def refusals(gateway: str) -> dict[str, str]:
            return {r["child_id"]: r["reason"]
                    for r in rest.get(f"/v1/devices/{gateway}/refusals").json()}

        wait_until(lambda: len(refusals(gw_id)) == 2, timeout=30, what="the refusals")
        assert refusals(gw_id) == {k1: f"'{k1}' is disabled",
                                   k3: f"'{gw_id}' has 2 children, its most"}
        assert refusals(plain_id) == {}
        wait_until(lambda: [v for _, v in points(rest, k1, "t")] == [2.0], what="k1's reading")
    finally:
        gw.close()
        other.close()
