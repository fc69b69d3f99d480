"""The device firmware (firmware/) against the real stack.

The device core, ``firmware/common/fleetline_device.py`` (the protocol logic of the ESP32
firmware and of the Raspberry Pi agent), runs here under CPython over
``firmware/raspberrypi/umqtt_paho.py``: umqtt.simple's API on paho-mqtt, the transport the
Pi agent uses, a real client on the real Mosquitto. Ingest and the API run as processes;
what the device did is read back over REST and from the database. The broker with the
auth plugin checks the tokens the hand-written HMAC signs.

The same core file also runs under MicroPython (its WebAssembly port under Node, npm
``@micropython/micropython-webassembly-pyscript``, pinned by
``firmware/tests/micropython/package-lock.json``), which has no sockets: there it talks
to an in-memory stand-in for umqtt.simple, and the ESP32 board files are compiled by
MicroPython's compiler. Nothing here runs on an ESP32 or a Raspberry Pi.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as mqtt
import pytest

from fleetline import devicekeys
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto
from tests.integration.test_api import client
from tests.support import DEVICE_KEY_SECRET, ApiProcess, IngestProcess, TcpProxy, wait_until

pytestmark = pytest.mark.integration

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
MICROPYTHON_DIR = FIRMWARE / "tests" / "micropython"
NPM_CI_TIMEOUT_SECONDS = 300
MICROPYTHON_RUN_TIMEOUT_SECONDS = 60
RUN_JOIN_TIMEOUT_SECONDS = 20

# The firmware's modules are plain files on a board (no package): import them from their
# folders, as the Pi agent's PYTHONPATH does.
for _folder in ("common", "raspberrypi"):
    if str(FIRMWARE / _folder) not in sys.path:
        sys.path.append(str(FIRMWARE / _folder))
fd = importlib.import_module("fleetline_device")
umqtt_paho = importlib.import_module("umqtt_paho")

log = logging.getLogger("tests.firmware")


def _load_agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fleetline_pi_agent", FIRMWARE / "raspberrypi" / "agent.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Counter:
    """A device's sensors: ``n`` counts readings, so every stored one can be accounted
    for."""

    def __init__(self) -> None:
        self.n = 0

    def read(self) -> dict[str, Any]:
        self.n += 1
        return {"n": self.n, "temp": 20.5, "missing": None}


class Running:
    """``device.run()`` in a thread of its own, as on a board; stopped on exit."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.thread = threading.Thread(
            target=device.run, name=f"firmware[{device.device_id}]", daemon=True
        )

    def __enter__(self) -> Any:
        self.thread.start()
        return self.device

    def __exit__(self, *_exc: object) -> None:
        self.device.stop()
        self.thread.join(RUN_JOIN_TIMEOUT_SECONDS)
        assert not self.thread.is_alive(), "the device loop did not stop"


class Observer:
    """A paho client subscribed to everything under devices/{id}/, recording it."""

    def __init__(self, port: int, device_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{secrets.token_hex(4)}"
        )
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(f"devices/{device_id}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "the observer did not subscribe"

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p in list(self.messages) if t == topic]

    def publish(self, topic: str, payload: Any) -> None:
        info = self.client.publish(topic, json.dumps(payload), qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_device(port: int, device_id: str, key: str, **options: Any) -> Any:
    options.setdefault("read_sensors", Counter().read)
    options.setdefault("backoff_min_s", 0.2)
    options.setdefault("backoff_max_s", 1.0)
    return fd.Device(
        device_id,
        key,
        "127.0.0.1",
        port,
        mqtt_client=umqtt_paho.MQTTClient,
        log=lambda line: log.info("%s: %s", device_id, line),
        **options,
    )


async def _register(
    api: ApiProcess, make_key: Callable[..., Any], device_id: str
) -> tuple[httpx.Client, str]:
    scopes = ("devices:read", "devices:write", "commands:write", "telemetry:read")
    c = client(api, await make_key(*scopes))
    created = c.post("/v1/devices", json={"id": device_id})
    assert created.status_code == 201, created.text
    return c, created.json()["credentials"]["key"]


async def _offline(db: asyncpg.Pool[Any], device_id: str) -> None:
    """No later test may find this device online."""
    await db.execute("UPDATE device_activity SET online = false WHERE device_id = $1", device_id)


async def _until_db(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await check()):
        assert loop.time() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.1)
    return found


def _at_least(values: Callable[[], Any], count: int) -> Callable[[], Any]:
    async def check() -> Any:
        found = await values()
        return found if len(found) >= count else None

    return check


def _stored_n(db: asyncpg.Pool[Any], device_id: str) -> Callable[[], Any]:
    async def values() -> list[float]:
        rows = await db.fetch(
            "SELECT value FROM readings WHERE device_id = $1 AND metric = 'n' ORDER BY value",
            device_id,
        )
        return [r["value"] for r in rows]

    return values


def _call(c: httpx.Client, device_id: str, method: str, params: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"timeout_s": 15}
    if params is not None:
        body["params"] = params
    resp = c.post(f"/v1/devices/{device_id}/methods/{method}", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def _twin(c: httpx.Client, device_id: str) -> dict[str, Any]:
    resp = c.get(f"/v1/devices/{device_id}/twin")
    assert resp.status_code == 200, resp.text
    twin: dict[str, Any] = resp.json()
    return twin


# -- the arithmetic ------------------------------------------------------------------


def test_hand_written_hmac_and_tokens_match_python_and_devicekeys() -> None:
    # RFC 4231, test case 1.
    assert fd.hmac_sha256(b"\x0b" * 20, b"Hi There").hex() == (
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    )
    for key_len in (0, 1, 31, 32, 63, 64, 65, 131, 200):
        for msg_len in (0, 1, 55, 64, 300):
            key, msg = os.urandom(key_len), os.urandom(msg_len)
            assert fd.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()

    secret = secrets.token_bytes(32)
    for device_id in ("esp32-01", "a.b:c_d-e", "x" * 128):
        key = devicekeys.derive_key(secret, device_id, 3)
        expiry = 1_900_000_000
        token = fd.sas_token(key, device_id, expiry)
        assert token == f"sig={devicekeys.sign(key, device_id, expiry)}&se={expiry}"
        assert devicekeys.verify_password(key, device_id, token, now=expiry - 1)
        assert not devicekeys.verify_password(key, device_id + "x", token, now=expiry - 1)
        text = devicekeys.connection_string(host="h.example", port=8883, device_id=device_id,
                                            key=key)
        assert fd.parse_connection_string(text) == {
            "HostName": "h.example", "Port": "8883", "DeviceId": device_id,
            "SharedAccessKey": key,
        }
    with pytest.raises(ValueError, match="SharedAccessKey"):
        fd.parse_connection_string("HostName=h;DeviceId=d")


def _npm_ci() -> None:
    package = MICROPYTHON_DIR / "node_modules/@micropython/micropython-webassembly-pyscript"
    if (package / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:  # never skip: a missing MicroPython must fail the run
        pytest.fail("npm is not on PATH: the MicroPython check needs Node 20+ and npm",
                    pytrace=False)
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=MICROPYTHON_DIR,
                            capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"


def test_the_core_runs_under_micropython() -> None:
    _npm_ci()
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    device_id = "esp-1"
    device_key = base64.b64encode(os.urandom(32)).decode()
    vectors = [(os.urandom(n), os.urandom(m)) for n, m in ((0, 0), (32, 40), (64, 1), (65, 200),
                                                           (100, 64))]
    tokens = [(base64.b64encode(os.urandom(32)).decode(), "dev-1", 1_800_000_000)]
    conn = "HostName=h;Port=1883;DeviceId=d;SharedAccessKey=abc="
    inp = {
        "hmac": [[base64.b64encode(k).decode(), base64.b64encode(m).decode()]
                 for k, m in vectors],
        "tokens": tokens, "connection_string": conn, "device_id": device_id, "key": device_key,
    }
    # Every MicroPython file of the firmware: the shared ones and each board's layer.
    board_files = sorted([*(FIRMWARE / "common").glob("*.py"), *FIRMWARE.glob("*/board.py")])
    assert {str(p.relative_to(FIRMWARE)) for p in board_files} >= {
        "common/boot.py", "common/main.py", "common/fleetline_board.py",
        "common/fleetline_umqtt.py", "common/config.example.py", "esp32/board.py",
        "esp8266/board.py", "pyboard/board.py"}
    args = [node, str(MICROPYTHON_DIR / "run.mjs"),
            "--lib", str(FIRMWARE / "common" / "fleetline_device.py")]
    for path in board_files:
        args += ["--compile", str(path)]
    args += ["--run", str(MICROPYTHON_DIR / "scenario.py")]
    proc = subprocess.run(args, input=json.dumps(inp), capture_output=True, text=True,
                          timeout=MICROPYTHON_RUN_TIMEOUT_SECONDS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for path in board_files:  # MicroPython's compiler took every board file
        assert f"compiled {path}" in lines
    [result_line] = [line for line in lines if line.startswith("RESULT ")]
    out = json.loads(result_line.removeprefix("RESULT "))
    assert out["implementation"] == "micropython"

    # The arithmetic: as CPython's hmac and fleetline.devicekeys.
    assert out["hmac"] == [base64.b64encode(hmac.new(k, m, hashlib.sha256).digest()).decode()
                           for k, m in vectors]
    assert out["tokens"] == [f"sig={devicekeys.sign(k, d, e)}&se={e}" for k, d, e in tokens]
    assert out["connection_string"] == {"HostName": "h", "Port": "1883", "DeviceId": "d",
                                        "SharedAccessKey": "abc="}

    # The session, call by call, between the scenario's marks.
    sections: dict[str, list[list[Any]]] = {}
    current = ""
    for call in out["calls"]:
        if call[0] == "--":
            current = call[1]
            sections[current] = []
        else:
            sections[current].append(call)
    base = f"devices/{device_id}/"
    new, will, connect, *subscribes, online = sections["connect"]
    new_calls = [new]
    assert new[:5] == ["new", device_id, "broker.local", 1883, device_id] and new[6] == 60
    assert devicekeys.verify_password(device_key, device_id, new[5])  # a live token
    assert will == ["will", base + "status", "offline", True, 1]
    assert connect == ["connect", True]
    # Subscribed before saying online (the API sends queued messages on that status).
    assert subscribes == [["subscribe", base + t, 1]
                          for t in ("c2d", "twin/desired", "methods/+/req")]
    assert online == ["publish", base + "status", "online", True, 1]

    report, reading = sections["first step"]
    assert report[1:3] == [base + "twin/reported", json.dumps({"fw": fd.VERSION})]
    first = json.loads(reading[2])
    assert reading[1] == base + "telemetry" and first["values"] == {"n": 1}
    assert isinstance(first["ts"], int) and first["ts"] > 1_700_000_000_000

    [v2] = sections["desired v2"]
    assert v2[1] == base + "twin/reported"
    assert json.loads(v2[2]) == {"interval_s": 5, "relay_on": False, "desired_version": 2}
    assert sections["desired v1 (stale)"] == []  # a lower version is ignored
    [v3] = sections["desired v3"]
    assert json.loads(v3[2]) == {"interval_s": 3600, "relay_on": True, "desired_version": 3}

    answers = {c[1]: json.loads(c[2]) for c in sections["methods"] if c[1].endswith("/res")}
    assert answers[base + "methods/r1/res"] == {"status": 200,
                                                "payload": {"pong": True, "params": {"x": 1}}}
    assert answers[base + "methods/r2/res"] == {"status": 200, "payload": 5}
    assert [answers[f"{base}methods/r{i}/res"]["status"] for i in range(3, 8)] == [
        404, 501, 400, 200, 400]  # unknown, reboot without hardware, bad params, ok, not JSON

    acks = [json.loads(c[2]) for c in sections["c2d"]]
    assert acks == [{"id": "m1", "outcome": "complete"}, {"id": "m1", "outcome": "complete"},
                    {"id": "m2", "outcome": "reject"}]
    assert out["acted"] == [[{"cmd": "open"}, {}], ["refuse", {}]]  # m1 acted on once

    assert sections["offline readings"] == [["close"]]  # no DISCONNECT: the Will fires
    assert out["backlog_offline"] == 5  # 8 taken offline, the 3 oldest dropped
    *reconnect, dropped, batch = sections["reconnect"]
    # The readings lost to the full backlog, reported once connected again.
    assert dropped[:2] == ["publish", base + "twin/reported"] and dropped[3:] == [False, 1]
    assert json.loads(dropped[2]) == {"backlog_dropped": 3, "backlog_write_errors": 0}
    # The same session again, with a token made anew (its expiry may be a second later).
    assert [c[:5] + c[6:] for c in reconnect[:1]] == [c[:5] + c[6:] for c in new_calls]
    assert devicekeys.verify_password(device_key, device_id, reconnect[0][5])
    assert reconnect[1:] == sections["connect"][1:]
    assert batch[1] == base + "telemetry"
    assert [r["values"]["n"] for r in json.loads(batch[2])] == [5, 6, 7, 8, 9]
    assert sections["stop"] == [["publish", base + "status", "offline", True, 1],
                                ["disconnect"]]
    assert out["counters"] == {"connects": 2, "readings_taken": 9, "readings_sent": 6,
                               "readings_dropped": 3, "c2d_acted": 2}


# -- on the real stack ---------------------------------------------------------------


async def test_device_publishes_and_serves_twin_methods_and_messages(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-esp"
    c, key = await _register(api, make_key, device_id)
    acted: list[Any] = []
    reboots: list[bool] = []
    device = make_device(
        broker.port, device_id, key, interval_s=0.5,
        methods={"add": lambda p: p["a"] + p["b"]},
        on_c2d=lambda body, _props: acted.append(body),
        reboot=lambda: reboots.append(True),
        reported={"fw": fd.VERSION, "model": "test"},
    )
    observer = Observer(broker.port, device_id)
    base = f"devices/{device_id}/"
    try:
        with Running(device):
            # Telemetry, stored by ingest; the status says online.
            latest = wait_until(
                lambda: (m := c.get(f"/v1/devices/{device_id}/latest").json().get("metrics"))
                and "n" in m and m, what="the device's readings")
            assert latest["temp"]["value"] == 20.5 and "missing" not in latest
            wait_until(lambda: c.get(f"/v1/devices/{device_id}").json()["online"],
                       what="the device online")

            # The desired twin, applied and reported: nothing left in the delta.
            patched = c.patch(f"/v1/devices/{device_id}/twin", json={"interval_s": 2})
            assert patched.status_code == 200, patched.text
            twin = wait_until(
                lambda: (t := _twin(c, device_id))["delta"] == {}
                and t["reported"].get("desired_version") == t["desired_version"] and t,
                timeout=30, what="the desired twin reported as applied")
            assert twin["reported"]["interval_s"] == 2 and twin["reported"]["fw"] == fd.VERSION
            assert device.interval_s == 2

            # A lower version (a late publish) is ignored. The request after it, from the
            # same client, is answered only once the device has taken the document.
            observer.publish(base + "twin/desired", {"version": 0, "desired": {"interval_s": 9}})
            observer.publish(base + "methods/probe/req", {"method": "ping"})
            wait_until(lambda: observer.payloads(base + "methods/probe/res"),
                       what="the probe's answer")
            assert device.interval_s == 2

            # Direct methods through the API.
            ping = _call(c, device_id, "ping", {"n": 1})
            assert (ping["status"], ping["payload"]) == (200, {"pong": True, "params": {"n": 1}})
            add = _call(c, device_id, "add", {"a": 2, "b": 3})
            assert (add["status"], add["payload"]) == (200, 5)
            assert _call(c, device_id, "selfdestruct")["status"] == 404
            reboot = _call(c, device_id, "reboot")
            assert (reboot["status"], reboot["payload"]) == (200, {"rebooting": True})
            wait_until(lambda: reboots, what="the reboot hook, after the answer")

            # A cloud-to-device message, completed; a redelivery acknowledged, not re-applied.
            posted = c.post(f"/v1/devices/{device_id}/messages",
                            json={"body": {"cmd": "open"}, "properties": {"type": "command"}})
            assert posted.status_code == 201, posted.text
            message_id = posted.json()["id"]
            wait_until(lambda: c.get(f"/v1/devices/{device_id}/messages/{message_id}")
                       .json()["state"] == "completed", what="the message completed")
            assert acted == [{"cmd": "open"}]
            observer.publish(base + "c2d", {"id": message_id, "body": {"cmd": "open"},
                                            "properties": {"type": "command"}})
            acks = wait_until(
                lambda: len(a := [json.loads(p) for p in observer.payloads(base + "c2d/ack")])
                >= 2 and a, what="the redelivery acknowledged")
            assert acks == [{"id": message_id, "outcome": "complete"}] * 2
            assert acted == [{"cmd": "open"}]
            message = c.get(f"/v1/devices/{device_id}/messages/{message_id}").json()
            assert message["state"] == "completed"
        # Stopped: it said offline itself (a clean DISCONNECT fires no Will).
        wait_until(lambda: observer.payloads(base + "status")[-1:] == [b"offline"],
                   what="the device's own offline")
        sent = device.readings_sent
        assert sent >= 1 and device.readings_dropped == 0
        stored = await _until_db(_at_least(_stored_n(db, device_id), sent),
                                 "every reading stored")
        assert stored == [float(n) for n in range(1, sent + 1)]
    finally:
        observer.close()
        await _offline(db, device_id)


async def test_readings_taken_offline_are_sent_as_a_batch_after_reconnecting(
    broker: LocalMosquitto, start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-esp"
    proxy = TcpProxy(("127.0.0.1", broker.port))
    proxy.up()
    device = make_device(proxy.port, device_id, "unused-on-an-anonymous-broker", auth="key",
                         interval_s=0.3)
    observer = Observer(broker.port, device_id)
    base = f"devices/{device_id}/"
    try:
        with Running(device):
            await _until_db(_at_least(_stored_n(db, device_id), 2), "readings before the drop")
            proxy.down()
            wait_until(lambda: device.client is None, what="the device to notice the drop")
            # The broker lost the connection without a DISCONNECT: it publishes the Will.
            wait_until(lambda: observer.payloads(base + "status")[-1:] == [b"offline"],
                       what="the Last Will")
            wait_until(lambda: len(device.backlog) >= 4, what="readings kept while offline")
            proxy.up()
            wait_until(lambda: device.connects >= 2 and not device.backlog, timeout=30,
                       what="the backlog sent after reconnecting")
            wait_until(lambda: observer.payloads(base + "status")[-1:] == [b"online"],
                       what="online again")
        batches = wait_until(
            lambda: [doc for p in observer.payloads(base + "telemetry")
                     if isinstance(doc := json.loads(p), list) and len(doc) >= 4],
            what="the backlog as one batch")
        assert all(isinstance(r["ts"], int) for b in batches for r in b)
        sent = device.readings_sent
        assert device.readings_dropped == 0
        stored = await _until_db(_at_least(_stored_n(db, device_id), sent),
                                 "every reading stored")
        assert stored == [float(n) for n in range(1, sent + 1)]  # none lost, none twice
    finally:
        observer.close()
        proxy.down()
        await _offline(db, device_id)


SECURE_SERVICES = {"fleetline-ingest": secrets.token_urlsafe(16)}


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[LocalMosquitto]:
    """Mosquitto with fleetline's auth plugin, checking keys derived from the secret the
    session's API hands out keys from."""
    auth = BrokerAuth(database_url, DEVICE_KEY_SECRET.encode(), services=SECURE_SERVICES)
    with LocalMosquitto(tmp_path_factory.mktemp("firmware-mosquitto"), auth=auth) as server:
        yield server


async def test_the_broker_accepts_the_devices_token_and_renewal_and_refuses_a_wrong_key(
    secure_broker: LocalMosquitto, api: ApiProcess, make_key: Callable[..., Any],
    db: asyncpg.Pool[Any], database_url: str, artifacts: Path, uid: str,
) -> None:
    name = "fleetline-ingest"
    ingest = IngestProcess(
        database_url=database_url, log_dir=artifacts, name=f"{uid}-firmware",
        mqtt_url=f"mqtt://{name}:{SECURE_SERVICES[name]}@127.0.0.1:{secure_broker.port}")
    ingest.start()
    device_id = f"{uid}-esp"
    _, key = await _register(api, make_key, device_id)
    try:
        # A token signed by the hand-written HMAC, valid 8 s: renewed 2 s before expiry by
        # reconnecting with a new one, which the plugin accepts too.
        device = make_device(secure_broker.port, device_id, key, auth="token",
                             token_ttl_s=8, interval_s=0.5)
        with Running(device):
            await _until_db(_at_least(_stored_n(db, device_id), 1), "a reading via the plugin")
            wait_until(lambda: device.connects >= 2, timeout=20, what="the token renewed")
            assert device.last_error is None
            before = device.readings_sent
            wait_until(lambda: device.readings_sent > before, what="readings after renewal")
        await _until_db(_at_least(_stored_n(db, device_id), device.readings_sent),
                        "the readings sent with both tokens")

        # The key itself is a password too.
        by_key = make_device(secure_broker.port, device_id, key, auth="key", interval_s=5)
        with Running(by_key):
            wait_until(lambda: by_key.connects == 1, what="a login with the key")

        # A wrong key signs a token the plugin refuses (CONNACK 5); the device backs off.
        wrong_key = base64.b64encode(os.urandom(32)).decode()
        wrong = make_device(secure_broker.port, device_id, wrong_key, auth="token")
        with Running(wrong):
            error = wait_until(lambda: wrong.last_error, what="the refusal")
        assert isinstance(error, umqtt_paho.MQTTException) and error.args == (5,)
        assert wrong.connects == 0
        wait_until(lambda: any(
            f"refused login of username '{device_id}'" in line and "bad token signature" in line
            for line in secure_broker.log_path.read_text(errors="replace").splitlines()),
            what="the plugin's reason in the broker log")
    finally:
        ingest.stop()
        await _offline(db, device_id)


async def test_pi_agent_drives_its_relay_and_reads_its_button_via_gpiozero(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path, tls_files: TlsFiles,
) -> None:
    from gpiozero.pins.mock import MockFactory

    agent_module = _load_agent()
    with pytest.raises(agent_module.AgentConfigError, match="FLEETLINE_AGENT_DEVICE_KEY"):
        agent_module.Settings({"FLEETLINE_AGENT_DEVICE_ID": "d",
                               "FLEETLINE_AGENT_MQTT_HOST": "h"})
    start_ingest()
    device_id = f"{uid}-pi"
    c, key = await _register(api, make_key, device_id)
    cpu_temp = tmp_path / "temp"
    cpu_temp.write_text("48500\n")  # as /sys/class/thermal/thermal_zone0/temp reads
    # Over TLS (the agent's default), the broker verified against the CA.
    settings = agent_module.Settings({
        "FLEETLINE_AGENT_CONNECTION_STRING": devicekeys.connection_string(
            host="127.0.0.1", port=broker.tls_port or 0, device_id=device_id, key=key),
        "FLEETLINE_AGENT_CA_FILE": str(tls_files.ca_cert),
        "FLEETLINE_AGENT_INTERVAL_S": "0.5",
        "FLEETLINE_AGENT_RELAY_PIN": "17",
        "FLEETLINE_AGENT_BUTTON_PIN": "27",
        "FLEETLINE_AGENT_CPU_TEMP_FILE": str(cpu_temp),
    })
    factory = MockFactory()
    agent = agent_module.Agent(settings, pin_factory=factory, backoff_min_s=0.2)
    relay, button = factory.pin(17), factory.pin(27)

    def latest() -> dict[str, Any]:
        metrics: dict[str, Any] = c.get(f"/v1/devices/{device_id}/latest").json()["metrics"]
        return {name: m["value"] for name, m in metrics.items()}

    runner = Running(agent.device)
    try:
        with runner:
            values = wait_until(lambda: (v := latest()) and "cpu_temp" in v and v,
                                what="the agent's readings")
            assert values["cpu_temp"] == 48.5 and values["button"] == 0
            assert values["relay_on"] == 0 and relay.state is False
            button.drive_low()  # pressed (the button pulls up)
            wait_until(lambda: latest()["button"] == 1, what="the pressed button")

            switched = _call(c, device_id, "switch", {"on": True})
            assert (switched["status"], switched["payload"]) == (200, {"on": True})
            assert relay.state is True
            wait_until(lambda: _twin(c, device_id)["reported"].get("relay_on") is True,
                       what="relay_on reported")
            assert _call(c, device_id, "switch", {"on": "yes"})["status"] == 400
            assert relay.state is True

            patched = c.patch(f"/v1/devices/{device_id}/twin", json={"relay_on": False})
            assert patched.status_code == 200, patched.text
            twin = wait_until(
                lambda: (t := _twin(c, device_id))["delta"] == {}
                and t["reported"].get("desired_version") == t["desired_version"] and t,
                what="the desired relay state applied")
            assert twin["reported"]["relay_on"] is False and relay.state is False
            assert twin["reported"]["model"] == agent_module.MODEL

            # `reboot` restarts the agent: it answers, then its loop ends (systemd would
            # start it again).
            answer = _call(c, device_id, "reboot")
            assert (answer["status"], answer["payload"]) == (200, {"rebooting": True})
            wait_until(lambda: not runner.thread.is_alive(), what="the agent to stop")
            assert agent.restart_requested
    finally:
        agent.close()
        await _offline(db, device_id)
