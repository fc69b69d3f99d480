"""Message routes end to end: devices publish over MQTT, the rules service (a real
process) routes their readings to a local HTTP receiver or an MQTT subscriber; ingest
applies the twin patches a route's query looks at. Real broker, real database."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho
import pytest

from fleetline_dev.embedded import BrokerAuth, LocalMosquitto
from tests.integration.test_rules import (
    Receiver,
    eventually,
    now_ms,
    rules_env,
    threshold_rule,
)
from tests.support import (
    DEVICE_KEY_SECRET,
    ApiProcess,
    Device,
    IngestProcess,
    RulesProcess,
    full_notify_queue,
    reading,
)

pytestmark = pytest.mark.integration
SERVICES = {"fleetline-rules": "rules-pw", "fleetline-test": "test-pw"}
TIMEOUT = 20.0


def routes_env(name: str) -> dict[str, str]:
    # Membership refreshed often, so a twin change shows within the test's patience.
    return rules_env(name) | {"FLEETLINE_RULES_ROUTE_REFRESH_INTERVAL_SECONDS": "0.5"}


@pytest.fixture(autouse=True)
async def _only_our_routes(db: asyncpg.Pool[Any]) -> None:
    # Routes and rules other tests left enabled would route or evaluate our readings too.
    await db.execute("UPDATE message_routes SET enabled = false WHERE enabled")
    await db.execute("UPDATE rules SET enabled = false WHERE enabled")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
async def admin(api: ApiProcess, make_key: Callable[..., Any]) -> AsyncIterator[httpx.Client]:
    http = httpx.Client(
        base_url=api.url, timeout=10, headers={"Authorization": f"Bearer {await make_key('admin')}"}
    )
    yield http
    http.close()


def register(admin: httpx.Client, device_id: str, **tags: str) -> str:
    resp = admin.post("/v1/devices", json={"id": device_id, "tags": tags})
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["credentials"]["key"]
    return key


def create_route(admin: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = admin.post("/v1/routes", json=body)
    assert resp.status_code == 201, resp.text
    route: dict[str, Any] = resp.json()
    return route


def delivered(admin: httpx.Client, route_id: int, count: int) -> list[dict[str, Any]] | None:
    items: list[dict[str, Any]] = admin.get(f"/v1/routes/{route_id}/deliveries").json()["items"]
    done = [d for d in items if d["status"] != "pending"]
    return items if len(items) == count and len(done) == count else None


async def queued(db: asyncpg.Pool[Any], route_id: int) -> list[tuple[str, int, dict[str, Any]]]:
    rows = await db.fetch(
        "SELECT device_id, ts, metrics FROM route_deliveries WHERE route_id = $1 ORDER BY ts",
        route_id,
    )
    return [
        (r["device_id"], round(r["ts"].timestamp() * 1000), json.loads(r["metrics"])) for r in rows
    ]


async def test_a_route_delivers_exactly_the_matching_readings_signed(
    start_rules: Callable[..., RulesProcess],
    start_ingest: Callable[..., IngestProcess],
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    rules = start_rules(env=routes_env(uid))
    start_ingest()
    site = f"{uid}-A"
    wanted, other_site, old_fw = f"{uid}-wanted", f"{uid}-siteB", f"{uid}-oldfw"
    register(admin, wanted, site=site)
    register(admin, other_site, site=f"{uid}-B")
    register(admin, old_fw, site=site)
    route = create_route(
        admin,
        {
            "name": f"{uid} hot at site A",
            "query": f"tags.site = '{site}' AND reported.fw >= '1.2'",
            "metric": "temp",
            "condition": {"op": ">", "value": 30},
            "destination": {
                "type": "webhook",
                "url": f"{receiver.url}/hook-{uid}",
                "secret": "route-secret",
            },
        },
    )
    devices = {d: Device(broker.url, d) for d in (wanted, other_site, old_fw, f"{uid}-stranger")}

    # The query looks at the reported twin, which ingest stores; the older one first,
    # so the refresh that sees the newer one sees both.
    for device_id, fw in ((old_fw, "1.1"), (wanted, "1.3")):
        devices[device_id].publish_all([{"fw": fw}], kind="twin/reported")
        await eventually(
            lambda d=device_id: db.fetchval(
                "SELECT reported ->> 'fw' FROM twin_reported WHERE device_id = $1", d
            ),
            timeout=TIMEOUT,
            what=f"{device_id}'s reported twin",
        )
    await eventually(
        lambda: rules.metric("fleetline_rules_routed_devices") == 1,
        timeout=TIMEOUT,
        what="the route to take the device with the new firmware",
    )

    base = now_ms()
    devices[wanted].publish_all(
        [
            [reading(base, temp=35), reading(base + 1, temp=25)],  # a batch: one of two
            reading(base + 2, hum=50),  # not the route's metric
            reading(base + 3, temp=31.5, hum=40),  # forwards temp only
            reading(base + 4, temp="hot"),  # text never meets a condition
        ]
    )
    for device_id in (other_site, old_fw, f"{uid}-stranger"):  # query false, unregistered
        devices[device_id].publish_all([reading(base, temp=40)])
    devices[wanted].publish_all([reading(base + 10, temp=99)])  # published last

    expected = [
        (wanted, base, {"temp": 35.0}),
        (wanted, base + 3, {"temp": 31.5}),
        (wanted, base + 10, {"temp": 99.0}),
    ]
    # The rules service handles messages in order: once the last one is queued, every
    # earlier one has been judged.
    await eventually(
        lambda: _has(db, route["id"], base + 10), timeout=TIMEOUT, what="the last reading"
    )
    assert await queued(db, route["id"]) == expected

    hooks = await eventually(
        lambda: len(receiver.on(f"/hook-{uid}")) >= 3 and receiver.on(f"/hook-{uid}"),
        timeout=TIMEOUT,
        what="three webhook calls",
    )
    log = await eventually(
        lambda: delivered(admin, route["id"], 3), timeout=TIMEOUT, what="the delivery log"
    )
    assert {d["status"] for d in log} == {"delivered"} and {d["attempts"] for d in log} == {1}
    assert len(receiver.on(f"/hook-{uid}")) == 3  # each once
    bodies = []
    for hook in hooks:
        digest = hmac.new(b"route-secret", hook["body"], hashlib.sha256).hexdigest()
        assert hook["headers"]["X-Fleetline-Signature"] == f"sha256={digest}"
        assert hook["headers"]["Content-Type"] == "application/json"
        body = json.loads(hook["body"])
        assert hook["headers"]["X-Fleetline-Delivery"] == body["delivery_id"]
        assert hook["headers"]["X-Fleetline-Route"] == str(route["id"])
        assert body["route_id"] == route["id"] and body["route"] == f"{uid} hot at site A"
        ts = datetime.fromisoformat(body["ts"])
        assert ts.tzinfo is not None and body["ts"].endswith("Z")
        bodies.append((body["device_id"], round(ts.timestamp() * 1000), body["values"]))
    assert sorted(bodies) == expected
    sent = {json.loads(h["body"])["delivery_id"] for h in hooks}
    assert {f"route-{d['id']}" for d in log} == sent

    # A re-sent reading (same device, ts and metric) is routed once.
    devices[wanted].publish_all([reading(base, temp=35), reading(base + 20, temp=98)])
    await eventually(lambda: _has(db, route["id"], base + 20), timeout=TIMEOUT, what="the re-send")
    assert len(await queued(db, route["id"])) == 4
    await eventually(lambda: delivered(admin, route["id"], 4), timeout=TIMEOUT, what="delivery")
    assert len(receiver.on(f"/hook-{uid}")) == 4
    assert rules.metric("fleetline_rules_routed_total") == 4
    assert "route-secret" not in rules.log_path.read_text()
    for dev in devices.values():
        dev.close()


async def _has(db: asyncpg.Pool[Any], route_id: int, ts_ms: int) -> bool:
    return bool(
        await db.fetchval(
            "SELECT 1 FROM route_deliveries WHERE route_id = $1 AND ts = $2",
            route_id,
            datetime.fromtimestamp(ts_ms // 1000, UTC) + timedelta(milliseconds=ts_ms % 1000),
        )
    )


async def test_a_failing_receiver_gets_the_reading_after_retries_and_a_dead_one_is_logged(
    start_rules: Callable[..., RulesProcess],
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    uid: str,
) -> None:
    rules = start_rules(env=routes_env(uid))  # 3 attempts, backoff from 0.2 s
    device_id = f"{uid}-pump"
    register(admin, device_id)
    receiver.statuses[f"/flaky-{uid}"] = [500, 503]
    receiver.statuses[f"/dead-{uid}"] = [500] * 10
    flaky, dead = (
        create_route(
            admin,
            {
                "name": f"{uid} {path}",
                "query": f"id = '{device_id}'",
                "destination": {"type": "webhook", "url": f"{receiver.url}/{path}-{uid}"},
            },
        )
        for path in ("flaky", "dead")
    )
    await eventually(
        lambda: (
            rules.metric("fleetline_rules_routes_loaded") == 2
            and rules.metric("fleetline_rules_routed_devices") == 1
        ),
        timeout=TIMEOUT,
        what="the routes to be loaded",
    )
    dev = Device(broker.url, device_id)
    ts = now_ms()
    dev.publish_all([reading(ts, pressure=2.5, running=True, mode="eco")])

    calls = await eventually(
        lambda: len(receiver.on(f"/flaky-{uid}")) >= 3 and receiver.on(f"/flaky-{uid}"),
        timeout=TIMEOUT,
        what="the third attempt",
    )
    assert len({c["headers"]["X-Fleetline-Delivery"] for c in calls}) == 1  # one delivery
    assert len({c["body"] for c in calls}) == 1
    assert "X-Fleetline-Signature" not in calls[0]["headers"]  # no secret, no signature
    body = json.loads(calls[0]["body"])
    # No metric: every value, as stored (booleans as 1/0).
    assert body["values"] == {"pressure": 2.5, "running": 1.0, "mode": "eco"}
    assert body["device_id"] == device_id and body["route_id"] == flaky["id"]
    (ok,) = await eventually(
        lambda: delivered(admin, flaky["id"], 1), timeout=TIMEOUT, what="the flaky log"
    )
    assert ok["status"] == "delivered" and ok["attempts"] == 3 and ok["response_status"] == 200
    (failed,) = await eventually(
        lambda: delivered(admin, dead["id"], 1), timeout=TIMEOUT, what="the dead log"
    )
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert failed["last_error"] == "HTTP 500" and failed["response_status"] == 500
    assert len(receiver.on(f"/dead-{uid}")) == 3
    dev.close()


async def test_a_receiver_that_never_answers_does_not_hold_up_other_routes(
    start_rules: Callable[..., RulesProcess],
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    uid: str,
) -> None:
    # Each request to the silent receiver waits 30 s for an answer that never comes.
    rules = start_rules(env=routes_env(uid) | {"FLEETLINE_RULES_ACTION_TIMEOUT_SECONDS": "30"})
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)  # connections complete in the kernel; nothing ever reads them
    device_id = f"{uid}-busy"
    register(admin, device_id)
    stuck, good = (
        create_route(
            admin,
            {
                "name": f"{uid} {name}",
                "query": f"id = '{device_id}'",
                "destination": {"type": "webhook", "url": url},
            },
        )
        for name, url in (
            ("stuck", f"http://127.0.0.1:{silent.getsockname()[1]}/hook"),
            ("good", f"{receiver.url}/good-{uid}"),
        )
    )
    await eventually(
        lambda: rules.metric("fleetline_rules_routes_loaded") == 2,
        timeout=TIMEOUT,
        what="the routes to be loaded",
    )
    dev = Device(broker.url, device_id)
    base = now_ms()
    dev.publish_all([reading(base + i, n=i) for i in range(40)])

    # Every reading reaches the good receiver while the silent one still holds its first
    # requests (well within their 30 s timeout).
    await eventually(
        lambda: len(receiver.on(f"/good-{uid}")) == 40, timeout=15, what="the good route"
    )
    pending = admin.get(f"/v1/routes/{stuck['id']}/deliveries", params={"limit": 1000}).json()
    assert len(pending["items"]) == 40
    assert {d["status"] for d in pending["items"]} == {"pending"}
    assert sum(d["attempts"] for d in pending["items"]) <= 8  # its share of the slots
    admin.delete(f"/v1/routes/{stuck['id']}")
    silent.close()
    dev.close()


async def test_routed_readings_survive_a_kill_9_of_the_rules_service(
    start_rules: Callable[..., RulesProcess],
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    # A retry waits 2 s: long enough to kill the service between two attempts.
    env = routes_env(uid) | {"FLEETLINE_RULES_ACTION_BACKOFF_SECONDS": "2"}
    rules = start_rules(env=env)
    device_id = f"{uid}-valve"
    register(admin, device_id)
    receiver.statuses[f"/kill-{uid}"] = [500]
    route = create_route(
        admin,
        {
            "name": f"{uid} kill",
            "query": f"id = '{device_id}'",
            "destination": {"type": "webhook", "url": f"{receiver.url}/kill-{uid}"},
        },
    )
    await eventually(
        lambda: rules.metric("fleetline_rules_routed_devices") == 1,
        timeout=TIMEOUT,
        what="the route to be loaded",
    )
    dev = Device(broker.url, device_id)
    first = now_ms()
    dev.publish_all([reading(first, flow=1.0)])
    await eventually(
        lambda: db.fetchval(
            "SELECT attempts = 1 AND status = 'pending' AND last_error = 'HTTP 500' "
            "FROM route_deliveries WHERE route_id = $1",
            route["id"],
        ),
        timeout=TIMEOUT,
        what="the first attempt to fail",
    )
    rules.kill()
    # Published while the service is down: the broker keeps them for its session.
    dev.publish_all([reading(first + 1, flow=2.0), reading(first + 2, flow=3.0)])
    start_rules(env=env)

    log = await eventually(
        lambda: delivered(admin, route["id"], 3), timeout=TIMEOUT, what="every delivery"
    )
    assert {d["status"] for d in log} == {"delivered"}
    assert sorted(d["attempts"] for d in log) == [1, 1, 2]
    flows = sorted(json.loads(r["body"])["values"]["flow"] for r in receiver.on(f"/kill-{uid}"))
    assert flows == [1.0, 1.0, 2.0, 3.0]  # the first one failed once, then went through
    dev.close()


# -- when the batch's write fails --------------------------------------------------------


def raise_now(name: str, device_id: str) -> dict[str, Any]:
    """A rule that raises on the first reading above 30 (no duration)."""
    return threshold_rule(name, [device_id], **{"raise": {"op": ">", "value": 30, "for_s": 0}})


async def alarm_of(db: asyncpg.Pool[Any], rule_id: int, device_id: str) -> Any:
    return await db.fetchval(
        "SELECT state FROM rule_alarms WHERE rule_id = $1 AND device_id = $2", rule_id, device_id
    )


async def test_a_full_notify_queue_costs_notifications_not_routed_readings_or_alarms(
    start_rules: Callable[..., RulesProcess],
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    """A batch that notifies fails at COMMIT while PostgreSQL's NOTIFY queue is full
    (54000): it is written again without notifications, not acknowledged as lost."""
    rules = start_rules(env=routes_env(uid))
    device_id = f"{uid}-full"
    register(admin, device_id)
    # As a full queue does: fail the commit of a batch that queues our device's
    # deliveries (and so notifies the delivery workers) unless it went quiet.
    undo = await full_notify_queue(
        db, uid, "route_deliveries", f"NEW.device_id = '{device_id}'", on="INSERT",
    )
    try:
        route = create_route(
            admin,
            {
                "name": f"{uid} full",
                "query": f"id = '{device_id}'",
                "destination": {"type": "webhook", "url": f"{receiver.url}/full-{uid}"},
            },
        )
        rule = admin.post("/v1/rules", json=raise_now(f"{uid} hot", device_id)).json()
        await eventually(
            lambda: (
                rules.metric("fleetline_rules_routed_devices") == 1
                and rules.metric("fleetline_rules_loaded") == 1
            ),
            timeout=TIMEOUT,
            what="the route and the rule to be loaded",
        )
        dev = Device(broker.url, device_id)
        dev.publish_all([reading(now_ms(), temp=35)])
        # Not woken by a notification, the delivery worker finds the row by polling.
        (call,) = await eventually(
            lambda: receiver.on(f"/full-{uid}"), timeout=TIMEOUT, what="the routed reading"
        )
        assert json.loads(call["body"])["values"] == {"temp": 35.0}
        assert await alarm_of(db, rule["id"], device_id) == "active"
        assert "NOTIFY queue is full" in rules.log_path.read_text()
        assert rules.metric("fleetline_rules_write_errors_total") >= 1
        await eventually(
            lambda: delivered(admin, route["id"], 1), timeout=TIMEOUT, what="the delivery log"
        )
        dev.close()
    finally:
        await undo()


async def test_a_refused_batch_is_retried_unacknowledged_and_only_what_is_refused_alone_is_dropped(
    start_rules: Callable[..., RulesProcess],
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    rules = start_rules(env=routes_env(uid))
    flaky, poison = f"{uid}-flaky", f"{uid}-poison"
    for device_id in (flaky, poison):
        register(admin, device_id, group=uid)
    # The database refuses our devices' deliveries: the flaky one's first three times as
    # a revoked permission would (not the content: retried), the poison one's readings
    # carrying `bad` as a value it cannot take (the content: refused every time).
    seq, fn, trigger = (f'"{uid}-{name}"' for name in ("seq", "fn", "trg"))
    await db.execute(f"""
        CREATE SEQUENCE {seq};
        CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.device_id = '{flaky}' AND nextval('{seq}') <= 3 THEN
                RAISE EXCEPTION 'permission denied (as if revoked)' USING ERRCODE = '42501';
            END IF;
            IF NEW.device_id = '{poison}' AND NEW.metrics ? 'bad' THEN
                RAISE EXCEPTION 'value out of range (as if)' USING ERRCODE = '22003';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER {trigger} AFTER INSERT ON route_deliveries
            FOR EACH ROW EXECUTE FUNCTION {fn}();
    """)
    try:
        route = create_route(
            admin,
            {
                "name": f"{uid} all",
                "query": f"tags.group = '{uid}'",
                "destination": {"type": "webhook", "url": f"{receiver.url}/all-{uid}"},
            },
        )
        rule = admin.post("/v1/rules", json=raise_now(f"{uid} hot", poison)).json()
        await eventually(
            lambda: (
                rules.metric("fleetline_rules_routed_devices") == 2
                and rules.metric("fleetline_rules_loaded") == 1
            ),
            timeout=TIMEOUT,
            what="the route and the rule to be loaded",
        )
        devices = {d: Device(broker.url, d) for d in (flaky, poison)}
        base = now_ms()

        # Refused three times for a reason that is not its content: written on the
        # fourth try, not acknowledged (and lost) after the first.
        devices[flaky].publish_all([reading(base, flow=1.5)])
        await eventually(lambda: _has(db, route["id"], base), timeout=TIMEOUT, what="the retry")
        assert await db.fetchval(f"SELECT last_value FROM {seq}") == 4
        assert "not acknowledged, retrying" in rules.log_path.read_text()

        # One message, two readings: the database refuses the first one's delivery alone;
        # the second and the alarm the first raised, written in the same batch, stay.
        devices[poison].publish_all(
            [[reading(base + 1, temp=35, bad=1), reading(base + 2, temp=36)]]
        )
        await eventually(
            lambda: _has(db, route["id"], base + 2), timeout=TIMEOUT, what="the good reading"
        )
        assert not await _has(db, route["id"], base + 1)
        assert await alarm_of(db, rule["id"], poison) == "active"
        log = rules.log_path.read_text()
        assert "route delivery left out: the database refuses it" in log
        assert "value out of range (as if)" in log
        assert rules.metric("fleetline_rules_write_errors_total") >= 5

        # Acknowledged and going on: a later reading is routed too.
        devices[flaky].publish_all([reading(base + 3, flow=2.5)])
        await eventually(
            lambda: delivered(admin, route["id"], 3), timeout=TIMEOUT, what="every delivery"
        )
        for dev in devices.values():
            dev.close()
    finally:
        await db.execute(
            f"DROP TRIGGER {trigger} ON route_deliveries; DROP FUNCTION {fn}(); "
            f"DROP SEQUENCE {seq}"
        )


# -- an MQTT destination, on a broker with the auth plugin ------------------------------


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[LocalMosquitto]:
    auth = BrokerAuth(database_url, DEVICE_KEY_SECRET.encode(), services=SERVICES)
    with LocalMosquitto(tmp_path_factory.mktemp("routes-mosquitto"), auth=auth) as server:
        yield server


def service_url(broker: LocalMosquitto, name: str) -> str:
    return f"mqtt://{name}:{SERVICES[name]}@127.0.0.1:{broker.port}"


class Subscriber:
    """A backend consumer of the route's topic (MQTT 5, a service account)."""

    def __init__(self, broker: LocalMosquitto, topic: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"sub-{topic}"[:64], protocol=paho.MQTTv5
        )
        self.client.username_pw_set("fleetline-test", SERVICES["fleetline-test"])
        self.client.on_message = lambda _c, _u, m: self.messages.append(m)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the subscriber could not subscribe"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_an_mqtt_route_publishes_each_reading_to_its_topic(
    start_rules: Callable[..., RulesProcess],
    admin: httpx.Client,
    secure_broker: LocalMosquitto,
    uid: str,
) -> None:
    rules = start_rules(env=routes_env(uid), mqtt_url=service_url(secure_broker, "fleetline-rules"))
    device_id = f"{uid}-meter"
    key = register(admin, device_id, site="north")
    topic = f"fleet/{uid}/energy"
    subscriber = Subscriber(secure_broker, topic)
    route = create_route(
        admin,
        {
            "name": f"{uid} energy",  # no query: every registered device
            "metric": "kwh",
            "destination": {"type": "mqtt", "topic": topic},
        },
    )
    await eventually(
        lambda: rules.metric("fleetline_rules_routes_loaded") == 1,
        timeout=TIMEOUT,
        what="the route to be loaded",
    )
    dev = Device(secure_broker.url, device_id, password=key)
    ts = now_ms()
    dev.publish_all([reading(ts, kwh=12.5, volts=231), reading(ts + 1, volts=230)])

    (msg,) = await eventually(lambda: subscriber.messages, timeout=TIMEOUT, what="the message")
    assert msg.topic == topic and msg.qos == 1
    body = json.loads(msg.payload)
    assert body["route_id"] == route["id"] and body["device_id"] == device_id
    assert body["values"] == {"kwh": 12.5}
    assert round(datetime.fromisoformat(body["ts"]).timestamp() * 1000) == ts
    properties = dict(msg.properties.UserProperty)
    assert properties["fleetline-delivery"] == body["delivery_id"]
    (logged,) = await eventually(
        lambda: delivered(admin, route["id"], 1), timeout=TIMEOUT, what="the delivery log"
    )
    assert logged["status"] == "delivered" and logged["attempts"] == 1
    assert len(subscriber.messages) == 1
    subscriber.close()
    dev.close()
