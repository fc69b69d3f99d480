"""Rules and alarms: REST, and the real rules service on the real broker and database.

Readings are published by `Device` (a real paho client) and evaluated by the rules
service running as a process, as production runs it; ingest runs beside it, so the
backtest replays what was stored. One rules process serves the module (each test's
rules name only its own devices); tests/e2e/test_rules_e2e.py kills one with -9.
Durations are short (for_s 1-2 s) and the ticker fast, so the module stays quick.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import asyncpg
import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from websockets.asyncio.client import connect

from fleetline_dev.embedded import LocalMosquitto, free_port
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess, Device, IngestProcess, RulesProcess, full_notify_queue

pytestmark = pytest.mark.integration


# -- helpers ---------------------------------------------------------------------------


class Receiver:
    """A local HTTP server standing in for webhook receivers and Pushsafer: it records
    every request, and answers each path with the statuses queued for it (then 200)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    queued = receiver.statuses.get(self.path) or []
                    status = queued.pop(0) if queued else 200
                answer = b'{"status": 1, "success": "message transmitted"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rules_env(name: str, receiver: Receiver | None = None) -> dict[str, str]:
    env = {
        "FLEETLINE_RULES_CLIENT_ID": f"test-rules-{name}",
        "FLEETLINE_RULES_SHARE_GROUP": f"r{name}"[:64],
        "FLEETLINE_RULES_TICK_INTERVAL_SECONDS": "0.1",
        "FLEETLINE_RULES_RELOAD_INTERVAL_SECONDS": "1",
        "FLEETLINE_RULES_FLUSH_INTERVAL_SECONDS": "0.2",
        "FLEETLINE_RULES_ACTION_BACKOFF_SECONDS": "0.2",
        "FLEETLINE_RULES_COMMAND_MIN_INTERVAL_SECONDS": "1",
        "FLEETLINE_RULES_ACTION_MAX_ATTEMPTS": "3",
    }
    if receiver is not None:
        env["FLEETLINE_RULES_PUSHSAFER_URL"] = f"{receiver.url}/pushsafer"
    return env


async def eventually(
    check: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def alarms_of(db: asyncpg.Pool[Any], rule_id: int) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM rule_alarms WHERE rule_id = $1 ORDER BY id", rule_id))


async def rules_loaded(rules: RulesProcess, db: asyncpg.Pool[Any]) -> None:
    """Until the rules service has loaded every enabled rule: it reloads on the NOTIFY of
    a rule created over REST (and every second here)."""

    async def loaded() -> bool:
        enabled = await db.fetchval("SELECT count(*) FROM rules WHERE enabled")
        return rules.metric("fleetline_rules_loaded") == enabled

    await eventually(loaded, what="the rules service to load the new rules")


def now_ms() -> int:
    return int(time.time() * 1000)


def threshold_rule(name: str, devices: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"devices": devices},
        "metric": "temp",
        "raise": {"op": ">", "value": 30, "for_s": 1.5},
        "clear": {"op": "<", "value": 28, "for_s": 1.0},
        "severity": "major",
        "message": "{device_id} at {value} C",
        **extra,
    }


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
async def rules_service(
    database_url: str,
    broker: LocalMosquitto,
    artifacts: Path,
    receiver: Receiver,
    db: asyncpg.Pool[Any],
) -> AsyncIterator[RulesProcess]:
    """One rules process and one ingest for the module. Rules other tests left behind
    (the schema test creates random ones, matching every device) are disabled first."""
    await db.execute("UPDATE rules SET enabled = false WHERE enabled")
    name = f"mod-{int(time.time())}"
    ingest = IngestProcess(
        database_url=database_url, mqtt_url=broker.url, log_dir=artifacts, name=f"rules-{name}"
    )
    rules = RulesProcess(
        database_url=database_url,
        mqtt_url=broker.url,
        log_dir=artifacts,
        name=name,
        env=rules_env(name, receiver),
    )
    ingest.start()
    rules.start()
    yield rules
    rules.stop()
    ingest.stop()


@pytest.fixture(scope="module")
async def admin(api: ApiProcess, make_key: Callable[..., Any]) -> httpx.Client:
    return client(api, await make_key("admin"))


# -- REST ------------------------------------------------------------------------------


async def test_rules_crud_over_rest_with_masked_secrets_and_validation(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    writer = client(api, await make_key("rules:write"))
    body = threshold_rule(
        f"{uid} hot fridge",
        [f"{uid}-d1"],
        match={"devices": [f"{uid}-d1"], "tags": {"site": "A"}},
        actions=[
            {"type": "webhook", "url": "https://example.org/hook", "secret": "s3cret-hook"},
            {"type": "pushsafer", "key": "psKey123", "device": "a"},
            {"type": "command", "device_id": "relay1", "method": "switch", "params": {"on": False}},
        ],
    )
    created = writer.post("/v1/rules", json=body)
    assert created.status_code == 201, created.text
    rule = created.json()
    assert rule["kind"] == "threshold" and rule["raise"]["op"] == ">" and rule["version"] == 1
    assert rule["clear"] == {"op": "<", "value": 28.0, "for_s": 1.0}
    assert rule["actions"][0]["secret"] == "********" and rule["actions"][1]["key"] == "********"
    assert "s3cret" not in created.text and "psKey" not in created.text
    stored = json.loads(await db.fetchval("SELECT actions FROM rules WHERE id = $1", rule["id"]))
    assert stored[0]["secret"] == "s3cret-hook"

    # A telemetry reader may read rules (secrets masked), not write them.
    reader = client(api, await make_key("telemetry:read"))
    got = reader.get(f"/v1/rules/{rule['id']}")
    assert got.status_code == 200 and got.json()["actions"][0]["secret"] == "********"
    assert_problem(reader.post("/v1/rules", json=body), 403, "rules:write")
    assert_problem(client(api, await make_key("devices:read")).get("/v1/rules"), 403)
    assert_problem(client(api).get("/v1/rules"), 401)

    # PUT with the mask keeps the stored secret; a new value replaces it.
    replaced = {
        **body,
        "raise": {"op": ">=", "value": 31, "for_s": 2},
        "actions": [
            {**body["actions"][0], "secret": "********"},
            {**body["actions"][1], "key": "newKey"},
        ],
    }
    put = writer.put(f"/v1/rules/{rule['id']}", json=replaced)
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 2 and put.json()["raise"]["value"] == 31
    stored = json.loads(await db.fetchval("SELECT actions FROM rules WHERE id = $1", rule["id"]))
    assert stored[0]["secret"] == "s3cret-hook" and stored[1]["key"] == "newKey"
    masked_without_secret = {
        **body,
        "actions": [{"type": "webhook", "url": "https://x.org", "secret": "********"}] * 2,
    }
    assert_problem(writer.put(f"/v1/rules/{rule['id']}", json=masked_without_secret), 400, "masked")

    # The offline rule of docs/protocol.md, and invalid bodies (422 problem+json).
    offline = writer.post(
        "/v1/rules",
        json={
            "name": f"{uid} offline",
            "kind": "no_data",
            "timeout_s": 120,
            "match": {"devices": [f"{uid}-d1"]},
        },
    )
    assert offline.status_code == 201 and offline.json()["timeout_s"] == 120
    for bad in (
        {**body, "raise": {"op": "~", "value": 1}},
        {**body, "raise": {"op": "outside", "low": 1}},
        {**body, "raise": {"op": ">"}},
        {**body, "metric": "bad metric"},
        {"name": "x", "kind": "no_data"},
        {**body, "actions": [{"type": "webhook", "url": "ftp://x"}]},
        {**body, "severity": "apocalyptic"},
    ):
        assert_problem(writer.post("/v1/rules", json=bad), 422)
    assert_problem(
        writer.post("/v1/rules", json={**body, "raise": {"op": "outside", "low": 5, "high": 1}}),
        400,
        "low <= high",
    )

    listed = writer.get("/v1/rules", params={"limit": 1000}).json()["items"]
    assert {rule["id"], offline.json()["id"]} <= {r["id"] for r in listed}
    assert writer.delete(f"/v1/rules/{rule['id']}").status_code == 204
    assert_problem(writer.get(f"/v1/rules/{rule['id']}"), 404)
    assert_problem(writer.delete(f"/v1/rules/{rule['id']}"), 404)
    writer.delete(f"/v1/rules/{offline.json()['id']}")


# -- live evaluation -------------------------------------------------------------------


async def test_alarm_raises_after_for_s_does_not_flap_and_clears_after_the_delay(
    rules_service: RulesProcess,
    admin: httpx.Client,
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    device_id = f"{uid}-fridge"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    rule = admin.post("/v1/rules", json=threshold_rule(f"{uid} hot", [device_id])).json()
    await rules_loaded(rules_service, db)  # it reloads on the NOTIFY
    token = await make_key("telemetry:read")
    dev = Device(broker.url, device_id)
    async with connect(
        f"ws://127.0.0.1:{api.port}/v1/stream?device={device_id}&events=alarm",
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        assert orjson.loads(await ws.recv())["type"] == "subscribed"
        start = now_ms()
        dev.publish_all([{"ts": start, "values": {"temp": 31}}])
        await asyncio.sleep(1.0)
        assert await alarms_of(db, rule["id"]) == [], "raised before for_s"
        (alarm,) = await eventually(lambda: alarms_of(db, rule["id"]), timeout=5, what="raise")
        assert alarm["state"] == "active" and alarm["value"] == 31
        # Raised when the condition had held for for_s (the reading's ts + 1.5 s).
        assert alarm["raised_at"] == datetime.fromtimestamp(start / 1000, UTC) + timedelta(
            seconds=1.5
        )
        assert alarm["message"] == f"{device_id} at 31 C"
        raised = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert raised["type"] == "alarm" and raised["alarm"]["id"] == alarm["id"]
        assert raised["alarm"]["state"] == "active" and raised["device_id"] == device_id

        # Around the threshold, inside the hysteresis band: one alarm, updated.
        for i in range(10):
            dev.publish_all([{"ts": now_ms(), "values": {"temp": 29.5 if i % 2 else 30.5 + i}}])
            await asyncio.sleep(0.05)
        await eventually(
            lambda: db.fetchval("SELECT count = 6 FROM rule_alarms WHERE id = $1", alarm["id"]),
            what="the alarm's count to follow the readings",
        )
        rows = await alarms_of(db, rule["id"])
        assert len(rows) == 1 and rows[0]["state"] == "active" and rows[0]["peak"] == 38.5

        # The clear condition must hold for 1 s before the alarm clears.
        cleared_from = now_ms()
        dev.publish_all([{"ts": cleared_from, "values": {"temp": 27}}])
        await asyncio.sleep(0.6)
        assert (await alarms_of(db, rule["id"]))[0]["state"] == "active", "cleared too early"
        (done,) = await eventually(
            lambda: db.fetch(
                "SELECT * FROM rule_alarms WHERE id = $1 AND state = 'cleared'", alarm["id"]
            ),
            timeout=5,
            what="clear",
        )
        assert done["cleared_at"] == datetime.fromtimestamp(cleared_from / 1000, UTC) + timedelta(
            seconds=1
        )
        assert done["cleared_by"] == "rules" and done["value"] == 27
        # Updates of the open alarm (value, count) come between; the clear comes last.
        async with asyncio.timeout(5):
            while (event := orjson.loads(await ws.recv()))["alarm"]["state"] != "cleared":
                assert event["alarm"]["id"] == alarm["id"]
        assert event["alarm"]["cleared_by"] == "rules" and event["alarm"]["value"] == 27
    history = admin.get(f"/v1/alarms/{alarm['id']}/history").json()
    assert [h["event"] for h in history] == ["raised", "cleared"]
    dev.close()


async def test_ack_and_clear_over_rest_with_who_and_when(
    rules_service: RulesProcess,
    admin: httpx.Client,
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    device_id = f"{uid}-boiler"
    rule = admin.post(
        "/v1/rules",
        json=threshold_rule(f"{uid} boil", [device_id])
        | {"raise": {"op": ">", "value": 30, "for_s": 0}},
    ).json()
    await rules_loaded(rules_service, db)
    dev = Device(broker.url, device_id)
    dev.publish_all([{"ts": now_ms(), "values": {"temp": 45}}])
    (alarm,) = await eventually(lambda: alarms_of(db, rule["id"]), what="raise")

    operator = client(api, await make_key("rules:write"))
    reader = client(api, await make_key("telemetry:read"))
    assert_problem(reader.post(f"/v1/alarms/{alarm['id']}/ack"), 403, "rules:write")
    acked = operator.post(f"/v1/alarms/{alarm['id']}/ack")
    assert acked.status_code == 200, acked.text
    assert acked.json()["state"] == "acknowledged"
    assert acked.json()["acknowledged_by"].startswith("test (key ")
    assert acked.json()["acknowledged_at"] is not None
    assert_problem(operator.post(f"/v1/alarms/{alarm['id']}/ack"), 409, "acknowledged")
    listed = reader.get("/v1/alarms", params={"rule_id": rule["id"], "state": "acknowledged"})
    assert [a["id"] for a in listed.json()["items"]] == [alarm["id"]]
    assert (
        reader.get("/v1/alarms", params={"rule_id": rule["id"], "state": "active"}).json()["items"]
        == []
    )

    cleared = operator.post(f"/v1/alarms/{alarm['id']}/clear")
    assert cleared.status_code == 200 and cleared.json()["state"] == "cleared"
    assert cleared.json()["cleared_by"] == acked.json()["acknowledged_by"]
    assert_problem(operator.post(f"/v1/alarms/{alarm['id']}/clear"), 409, "cleared")
    assert_problem(operator.post(f"/v1/alarms/{alarm['id']}/ack"), 409)
    assert_problem(operator.post("/v1/alarms/999999999/ack"), 404)
    history = reader.get(f"/v1/alarms/{alarm['id']}/history").json()
    assert [(h["event"], h["actor"]) for h in history] == [
        ("raised", "rules"),
        ("acknowledged", acked.json()["acknowledged_by"]),
        ("cleared", acked.json()["acknowledged_by"]),
    ]

    # Cleared by hand while still hot: the service starts over, the condition holds from
    # the clear on, and a new alarm is raised for_s (0 here) later; readings after the
    # clear update the new alarm, never the cleared one.
    dev.publish_all([{"ts": now_ms(), "values": {"temp": 46}}])
    rows = await eventually(
        lambda: _two(alarms_of(db, rule["id"])), what="a new alarm after the manual clear"
    )
    assert rows[0]["state"] == "cleared" and rows[0]["count"] == 1 and rows[0]["value"] == 45
    assert rows[1]["state"] == "active"
    await eventually(
        lambda: db.fetchval("SELECT value = 46 FROM rule_alarms WHERE id = $1", rows[1]["id"]),
        what="the new alarm to take the reading",
    )
    dev.close()


async def test_a_rule_on_a_module_series_raises_on_the_module_readings_only(
    rules_service: RulesProcess,
    admin: httpx.Client,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    """A module's readings (devices/{id}/modules/{m}/telemetry) are the device's series
    "{m}/{metric}" for rules as for storage: a rule on "env/temp" is not raised by the
    device's own "temp"."""
    device_id = f"{uid}-station"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    rule = admin.post(
        "/v1/rules",
        json=threshold_rule(f"{uid} module", [device_id])
        | {"metric": "env/temp", "raise": {"op": ">", "value": 30, "for_s": 0}},
    ).json()
    await rules_loaded(rules_service, db)
    dev = Device(broker.url, device_id)
    # Each a millisecond after the one before: a reading no later than the last one of its
    # series is not evaluated, and a broker on this machine answers within a millisecond.
    start = now_ms()
    dev.publish_all([{"ts": start, "values": {"temp": 45}}])
    dev.publish_all([{"ts": start + 1, "values": {"temp": 20}}], kind="modules/env/telemetry")
    dev.publish_all([{"ts": start + 2, "values": {"temp": 41}}], kind="modules/env/telemetry")
    (alarm,) = await eventually(lambda: alarms_of(db, rule["id"]), what="raise")
    fields = ("device_id", "metric", "value", "peak", "count")
    assert tuple(alarm[f] for f in fields) == (device_id, "env/temp", 41, 41, 1), dict(alarm)
    dev.close()


async def _two(rows: Any) -> list[asyncpg.Record] | None:
    found = await rows
    return found if len(found) == 2 else None


async def test_offline_alarm_after_the_timeout_and_at_once_on_the_last_will(
    rules_service: RulesProcess,
    admin: httpx.Client,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    quiet, dropped, ghost = f"{uid}-quiet", f"{uid}-dropped", f"{uid}-ghost"
    # Offline detection watches registered devices; the ghost is not registered.
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", [quiet, dropped])
    fast = admin.post(
        "/v1/rules",
        json={
            "name": f"{uid} silent",
            "kind": "no_data",
            "timeout_s": 1.5,
            "severity": "critical",
            "match": {"devices": [quiet, ghost]},
        },
    ).json()
    slow = admin.post(
        "/v1/rules",
        json={
            "name": f"{uid} will",
            "kind": "no_data",
            "timeout_s": 300,
            "match": {"devices": [dropped]},
            "message": "{device_id} went away",
        },
    ).json()
    await rules_loaded(rules_service, db)
    q, d, g = Device(broker.url, quiet), Device(broker.url, dropped), Device(broker.url, ghost)
    q.publish_all([{"values": {"temp": 20}}])
    d.publish_all([{"values": {"temp": 20}}])
    g.publish_all([{"values": {"temp": 20}}])
    g.close()
    sent = time.monotonic()
    await asyncio.sleep(1.0)
    assert await alarms_of(db, fast["id"]) == [], "offline before the timeout"
    (alarm,) = await eventually(lambda: alarms_of(db, fast["id"]), timeout=5, what="offline")
    assert alarm["device_id"] == quiet  # none for the unregistered ghost
    assert time.monotonic() - sent < 4
    assert alarm["severity"] == "critical" and alarm["state"] == "active"
    # It comes back: cleared at once.
    q.publish_all([{"values": {"temp": 21}}])
    await eventually(
        lambda: db.fetchval("SELECT state = 'cleared' FROM rule_alarms WHERE id = $1", alarm["id"]),
        what="clear on return",
    )

    # The broker publishes the Last Will (offline): raised without waiting 300 s.
    d.publish(b"offline", kind="status").wait_for_publish(5)
    (gone,) = await eventually(lambda: alarms_of(db, slow["id"]), timeout=5, what="last will")
    assert gone["message"] == f"{dropped} went away"
    d.publish(b"online", kind="status").wait_for_publish(5)
    await eventually(
        lambda: db.fetchval("SELECT state = 'cleared' FROM rule_alarms WHERE id = $1", gone["id"]),
        what="clear on online",
    )
    assert len(await alarms_of(db, fast["id"])) == 1
    q.close()
    d.close()


# -- actions ---------------------------------------------------------------------------


async def test_webhook_pushsafer_and_command_actions_are_delivered_signed_and_logged(
    rules_service: RulesProcess,
    admin: httpx.Client,
    receiver: Receiver,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    device_id, relay = f"{uid}-tank", f"{uid}-relay"
    commands: list[tuple[str, bytes]] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{uid}-sub")
    sub.on_message = lambda _c, _u, m: commands.append((m.topic, bytes(m.payload)))
    host, port = broker.url.removeprefix("mqtt://").split(":")
    sub.connect(host, int(port))
    sub.subscribe(f"devices/{relay}/methods/+/req", qos=1)
    sub.loop_start()
    receiver.statuses[f"/flaky-{uid}"] = [500, 503]  # two failures, then delivered
    rule = admin.post(
        "/v1/rules",
        json={
            "name": f"{uid} level",
            "match": {"devices": [device_id]},
            "metric": "level",
            "raise": {"op": ">=", "value": 90, "for_s": 0},
            "severity": "warning",
            "message": "{device_id} level {value}%",
            "actions": [
                {
                    "type": "webhook",
                    "url": f"{receiver.url}/hook-{uid}",
                    "secret": "hook-secret",
                    "on": ["raised", "cleared"],
                },
                {"type": "pushsafer", "key": "ps-private-key", "device": "42"},
                {
                    "type": "command",
                    "device_id": relay,
                    "method": "switch",
                    "params": {"on": False},
                },
                {"type": "webhook", "url": f"{receiver.url}/flaky-{uid}"},
            ],
        },
    ).json()
    await rules_loaded(rules_service, db)
    dev = Device(broker.url, device_id)
    dev.publish_all([{"ts": now_ms(), "values": {"level": 95}}])
    (alarm,) = await eventually(lambda: alarms_of(db, rule["id"]), what="raise")

    (hook,) = await eventually(lambda: receiver.on(f"/hook-{uid}"), what="webhook")
    expected = hmac.new(b"hook-secret", hook["body"], hashlib.sha256).hexdigest()
    assert hook["headers"]["X-Fleetline-Signature"] == f"sha256={expected}"
    assert hook["headers"]["Content-Type"] == "application/json"
    payload = json.loads(hook["body"])
    assert payload["event"] == "raised" and payload["rule"] == {
        "id": rule["id"],
        "name": f"{uid} level",
    }
    assert payload["alarm"]["id"] == alarm["id"] and payload["alarm"]["value"] == 95
    assert payload["alarm"]["message"] == f"{device_id} level 95%"

    pushes = await eventually(
        lambda: [r for r in receiver.on("/pushsafer") if f"{uid}" in r["body"].decode()],
        what="pushsafer",
    )
    form = parse_qs(pushes[0]["body"].decode())
    assert form["k"] == ["ps-private-key"] and form["d"] == ["42"]
    assert form["m"] == [f"{device_id} level 95%"] and f"{uid} level" in form["t"][0]

    ((topic, body),) = await eventually(lambda: commands, what="command")
    assert topic.startswith(f"devices/{relay}/methods/") and topic.endswith("/req")
    assert json.loads(body) == {"method": "switch", "params": {"on": False}}

    await eventually(lambda: len(receiver.on(f"/flaky-{uid}")) == 3, what="retries")
    deliveries = await eventually(
        lambda: _all_delivered(admin, alarm["id"], 4), timeout=10, what="delivery log"
    )
    by_index = {d["action_index"]: d for d in deliveries}
    assert by_index[3]["attempts"] == 3 and by_index[3]["response_status"] == 200
    assert by_index[0]["action"]["secret"] == "********"
    assert by_index[1]["action"]["key"] == "********"
    assert "hook-secret" not in json.dumps(deliveries)
    assert "ps-private-key" not in rules_service.log_path.read_text()

    # Clearing runs the actions that asked for it (the first webhook only).
    dev.publish_all([{"ts": now_ms(), "values": {"level": 50}}])
    cleared = await eventually(
        lambda: [
            r for r in receiver.on(f"/hook-{uid}") if json.loads(r["body"])["event"] == "cleared"
        ],
        what="webhook on clear",
    )
    assert json.loads(cleared[0]["body"])["alarm"]["state"] == "cleared"
    assert len(commands) == 1
    sub.loop_stop()
    sub.disconnect()
    dev.close()


async def test_commands_are_rate_limited_per_target_and_failures_end_up_logged(
    rules_service: RulesProcess,
    admin: httpx.Client,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    devices, relay = [f"{uid}-p{i}" for i in range(2)], f"{uid}-relay"
    arrivals: list[float] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{uid}-sub")
    sub.on_message = lambda _c, _u, _m: arrivals.append(time.monotonic())
    host, port = broker.url.removeprefix("mqtt://").split(":")
    sub.connect(host, int(port))
    sub.subscribe(f"devices/{relay}/methods/+/req", qos=1)
    sub.loop_start()
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    rule = admin.post(
        "/v1/rules",
        json={
            "name": f"{uid} pressure",
            "match": {"devices": devices},
            "metric": "bar",
            "raise": {"op": ">", "value": 5, "for_s": 0},
            "actions": [
                {"type": "command", "device_id": relay, "method": "vent"},
                {"type": "webhook", "url": nobody},
            ],
        },
    ).json()
    await rules_loaded(rules_service, db)
    pubs = [Device(broker.url, d) for d in devices]
    for dev in pubs:
        dev.publish_all([{"ts": now_ms(), "values": {"bar": 7}}])
    await eventually(lambda: len(arrivals) == 2, timeout=10, what="both commands")
    # Two alarms at once, one target: the second command waited for the 1 s interval.
    assert arrivals[1] - arrivals[0] >= 0.9
    alarms = await alarms_of(db, rule["id"])
    assert len(alarms) == 2
    failed = await eventually(
        lambda: [
            d
            for d in admin.get(f"/v1/alarms/{alarms[0]['id']}/deliveries").json()
            if d["action_type"] == "webhook" and d["status"] == "failed"
        ],
        timeout=10,
        what="the unreachable webhook to give up",
    )
    assert failed[0]["attempts"] == 3 and "Connect" in failed[0]["last_error"]
    assert await db.fetchval("SELECT 1") == 1  # and the service is still evaluating:
    pubs[0].publish_all([{"ts": now_ms(), "values": {"bar": 1}}])
    await eventually(
        lambda: db.fetchval(
            "SELECT state = 'cleared' FROM rule_alarms WHERE id = $1", alarms[0]["id"]
        ),
        what="clear after the failures",
    )
    sub.loop_stop()
    sub.disconnect()
    for dev in pubs:
        dev.close()


def _all_delivered(api: httpx.Client, alarm_id: int, n: int) -> list[dict[str, Any]] | None:
    rows: list[dict[str, Any]] = api.get(f"/v1/alarms/{alarm_id}/deliveries").json()
    if len(rows) >= n and all(r["status"] == "delivered" for r in rows):
        return rows
    return None


# -- backtest --------------------------------------------------------------------------


@pytest.mark.storage
async def test_backtest_returns_what_live_evaluation_raised_on_the_same_readings(
    rules_service: RulesProcess,
    admin: httpx.Client,
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    devices = [f"{uid}-a", f"{uid}-b"]
    rule = admin.post(
        "/v1/rules",
        json=threshold_rule(f"{uid} bt", devices)
        | {
            # Twice the delays (and the spacing below) that a loaded machine could make a
            # delivery overtake: a pending raise fires on the clock, not on the next reading.
            "raise": {"op": ">", "value": 30, "for_s": 2.0},
            "clear": {"op": "<", "value": 28, "for_s": 1.2},
        },
    ).json()
    await rules_loaded(rules_service, db)
    start = datetime.now(UTC) - timedelta(seconds=1)
    pubs = [Device(broker.url, d) for d in devices]
    # Readings 0.8 s apart, each stamped with the time it is due (not when the publish
    # got through, which a loaded machine delays). a: raised (held 2 s), cleared (held
    # 1.2 s), raised again, open at the end. b: a blip too short to raise, then raised,
    # then dancing in the hysteresis band (29-31) without clearing.
    series = {
        devices[0]: [25, 31, 32, 33, 34, 27, 27, 27, 31, 31, 31, 31],
        devices[1]: [31, 25, 31, 31, 31, 31, 29, 31, 29, 31, 29, 29],
    }
    base = time.time() + 0.3
    for i in range(12):
        due = base + 0.8 * i
        await asyncio.sleep(max(0.0, due - time.time()))
        for dev in pubs:
            ts = int(due * 1000)
            dev.publish_all([{"ts": ts, "values": {"temp": series[dev.device_id][i]}}])
    await asyncio.sleep(3.0)  # timers due, open alarms flushed
    live = await db.fetch(
        "SELECT device_id, raised_at, cleared_at, value, peak, count FROM rule_alarms "
        "WHERE rule_id = $1 ORDER BY raised_at, device_id",
        rule["id"],
    )
    assert [(r["device_id"], r["cleared_at"] is None) for r in live] == [
        (devices[0], False),
        (devices[1], True),
        (devices[0], True),
    ], live
    await eventually(
        lambda: db.fetchval(
            "SELECT count(*) = 24 FROM readings WHERE device_id = ANY($1)", devices
        ),
        what="ingest to store the readings",
    )
    to = datetime.now(UTC)
    resp = admin.post(
        f"/v1/rules/{rule['id']}/backtest?"
        + urlencode({"from": start.isoformat(), "to": to.isoformat()})
    )
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["readings"] == 24
    simulated = [
        (
            a["device_id"],
            datetime.fromisoformat(a["raised_at"]),
            a["cleared_at"] and datetime.fromisoformat(a["cleared_at"]),
            a["value"],
            a["peak"],
            a["count"],
        )
        for a in result["alarms"]
    ]
    assert simulated == [tuple(r) for r in live]
    # And the backtest of a rule that raises nothing, over the same data.
    quiet = admin.post(
        "/v1/rules",
        json=threshold_rule(f"{uid} bt2", devices)
        | {"raise": {"op": ">", "value": 100, "for_s": 0}, "enabled": False},
    ).json()
    none = admin.post(
        f"/v1/rules/{quiet['id']}/backtest?"
        + urlencode({"from": start.isoformat(), "to": to.isoformat()})
    ).json()
    assert none["alarms"] == [] and none["readings"] == 24
    empty = admin.post(
        f"/v1/rules/{quiet['id']}/backtest?"
        + urlencode({"from": to.isoformat(), "to": start.isoformat()})
    )
    assert empty.status_code == 200 and empty.json()["readings"] == 0
    assert_problem(
        admin.post(
            f"/v1/rules/{quiet['id']}/backtest?" + urlencode({"from": "2026-02-30T00:00:00Z"})
        ),
        400,
        "not a valid time",
    )
    for dev in pubs:
        dev.close()


async def test_a_full_notify_queue_costs_no_rule_change(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    """Rule writes notify the rules service; when PostgreSQL's NOTIFY queue is full the
    COMMIT fails (54000), and the API writes the change again without notifying."""
    name = f"{uid} quiet"
    undo = await full_notify_queue(db, uid, "rules", f"NEW.name = '{name}'")
    try:
        writer = client(api, await make_key("rules:write"))
        body = threshold_rule(name, [f"{uid}-d1"])
        created = writer.post("/v1/rules", json=body)
        assert created.status_code == 201, created.text
        rule = created.json()
        assert await db.fetchval("SELECT count(*) FROM rules WHERE name = $1", name) == 1
        replaced = writer.put(f"/v1/rules/{rule['id']}", json={**body, "enabled": False})
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["enabled"] is False
        assert api.log_tail(200).count("NOTIFY queue is full") >= 2
    finally:
        await undo()
