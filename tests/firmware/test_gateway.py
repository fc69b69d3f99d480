"""The BLE gateway on real MicroPython: firmware/common/fleetline_gateway.py with
fleetline_bthome.py, the device core, micropython-lib's umqtt.simple and aioble.

The unix port of MicroPython 1.28.0 (scripts/build-micropython.sh) has no radio: the
fake ``bluetooth`` module (tests/firmware/fakes/bluetooth.py) stands in for the BLE
stack under the real aioble, playing a scenario the test writes (sensors with MACs and
BTHome v2 adverts, well-formed and malformed; a sensor disappears when the test rewrites
it). aioble goes on the board as ``mip install aioble-central`` puts it (its core and
central parts only), compiled like the rest (``.mpy``), from the micropython-lib the
build keeps beside umqtt.simple.

- the BTHome parser, under MicroPython, against adverts built here with ``struct``, and
  the unit of each metric;
- the gateway on a broker without the auth plugin (driver ``drive_gateway.py``, an
  observer on ``devices/#``): the children's statuses, readings, reported properties
  (``units`` once per child), methods, cloud-to-device messages and desired twin (a
  rollout's notification answered ``failed``) on their own topics; a sensor that
  goes silent goes offline; the number of children bounded; readings kept through an
  outage in a bounded queue; 32 children in an ESP32 app's heap;
- the ESP32 application configured as a gateway (``GATEWAY = True``: boot.py then
  main.py, as on a board) over TLS to the broker with the auth plugin, ingest and the
  API: children created with their parent and tags, their readings stored, their units
  in their twins, their methods and messages served through the REST API, a rollout
  over them failing each at once with the gateway's reason, a silent sensor offline, and when
  the gateway is killed its children offline because of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from fleetline_cli import firmware
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import LocalMosquitto
from tests.firmware.conftest import REPORT, MicroPython, compiled, mpy
from tests.firmware.test_board import Board, build
from tests.firmware.test_unix_port import micropython_env
from tests.stack import Backend, serve_stack
from tests.support import TcpProxy, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "firmware" / "common"
FAKES = Path(__file__).with_name("fakes")
DRIVER = Path(__file__).with_name("drive_gateway.py")
BTHOME_DRIVER = Path(__file__).with_name("drive_bthome.py")
GATEWAY_MODULES = ("fleetline_gateway.py", "fleetline_bthome.py")
# What `mip install aioble-central` puts on a board: aioble's core and its central role.
AIOBLE_CENTRAL = ("__init__.py", "core.py", "device.py", "central.py")
HEAP_KIB = 110  # what an ESP32 app has free
# The ESP32 application as a gateway over TLS runs in 150K on this 64-bit port (at 140K its
# first TLS context does not fit), where it runs in 110K without the gateway; a 32-bit
# board's objects take a little over half (firmware/README.md, "Gateway"). With a margin:
APP_HEAP_KIB = 160
# 32 children and a full queue beside the fake radio's own 32 KB (its module and a
# 40-sensor scenario, which a board keeps outside MicroPython's heap): at 160K the heap is
# 90 % full and too fragmented for a 1.5 KB batch.
CROWD_HEAP_KIB = 192
STEP_TIMEOUT_SECONDS = 30
RUN_TIMEOUT_SECONDS = 60


# -- BTHome v2 adverts, built the way a sensor sends them -------------------------------


def ad(kind: int, data: bytes) -> bytes:
    """One AD structure: its length, its type, its data."""
    return bytes([len(data) + 1, kind]) + data


FLAGS = ad(0x01, b"\x06")


def obj(object_id: int, fmt: str, value: int) -> bytes:
    return bytes([object_id]) + struct.pack(fmt, value)


def th(packet: int, temperature: float, humidity: float, battery: int) -> bytes:
    """A thermometer's objects: packet id, battery %, temperature, humidity."""
    return (
        obj(0x00, "<B", packet)
        + obj(0x01, "<B", battery)
        + obj(0x02, "<h", round(temperature * 100))
        + obj(0x03, "<H", round(humidity * 100))
    )


def advert(objects: bytes, name: str | None = None, info: int = 0x40) -> str:
    """Advertising data (hex): flags, the BTHome service data (UUID 0xFCD2, the device
    information byte ``info``: 0x40 is v2, unencrypted), the name."""
    data = FLAGS + ad(0x16, b"\xd2\xfc" + bytes([info]) + objects)
    if name is not None:
        data += ad(0x09, name.encode())
    return data.hex()


# Adverts no child may come of: each is counted and dropped.
MALFORMED = [
    advert(bytes([0x02, 0x01])),  # a temperature cut short
    advert(obj(0x02, "<h", 100), info=0x41),  # encrypted
    advert(obj(0x02, "<h", 100), info=0x20),  # BTHome v1's device information
    (FLAGS + bytes([0x1A, 0x16, 0xD2, 0xFC, 0x40])).hex(),  # a length past the end
    (FLAGS + ad(0x16, b"\xd2\xfc")).hex(),  # no device information
    advert(bytes([0x00])),  # a packet id without its value
]
FOREIGN = [(FLAGS + ad(0x09, b"phone")).hex(), "", "ff"]  # no BTHome data (or nothing)
# The BTHome objects with a unit: object id, size in bytes.
EVERY_UNIT = [
    (0x01, 1),
    (0x02, 2),
    (0x03, 2),
    (0x04, 3),
    (0x05, 3),
    (0x08, 2),
    (0x0A, 3),
    (0x0B, 3),
    (0x0C, 2),
    (0x0D, 2),
    (0x0E, 2),
    (0x12, 2),
    (0x13, 2),
    (0x14, 2),
    (0x3F, 2),
    (0x40, 2),
    (0x43, 2),
]


def macs(count: int) -> list[str]:
    """``count`` MACs of a prefix of this run's own: retained statuses of other runs on
    the same broker are other children's."""
    prefix = secrets.token_hex(3)
    return [f"{prefix}{i:06x}" for i in range(1, count + 1)]


def sensor(mac: str, adverts: list[str], rssi: int = -60, every_ms: int = 300) -> dict[str, Any]:
    return {"addr": mac, "rssi": rssi, "every_ms": every_ms, "adverts": adverts}


def write_scenario(fakes: Path, sensors: list[dict[str, Any]]) -> None:
    """The fake radio's world, written whole then renamed (the fake reads it anew)."""
    fakes.mkdir(parents=True, exist_ok=True)
    temporary = fakes / "ble.jsonl.tmp"
    temporary.write_text("".join(json.dumps(s) + "\n" for s in sensors))
    os.replace(temporary, fakes / "ble.jsonl")


def fake_radio_scenario(fakes: Path) -> int:
    """The heap the fake radio's scenario took (its file ble_events says)."""
    for line in (fakes / "ble_events").read_text().splitlines():
        if line.startswith("scenario_bytes "):
            return int(line.split()[1])
    raise AssertionError("the fake radio did not say what its scenario takes")


def child_id(mac: str) -> str:
    return f"ble-{mac}"


# -- MicroPython ---------------------------------------------------------------------


def aioble_source(mp: MicroPython) -> Path:
    """aioble in the micropython-lib the build keeps (beside umqtt.simple)."""
    folder = mp.umqtt_simple.parent / "bluetooth" / "aioble" / "aioble"
    assert (folder / "central.py").is_file(), f"no aioble in {folder}"
    return folder


def gateway_compiled(mp: MicroPython, folder: Path) -> Path:
    """The gateway's modules and aioble's central part, as ``.mpy`` in ``folder``."""
    for name in GATEWAY_MODULES:
        mpy(mp, COMMON / name, folder / name.replace(".py", ".mpy"))
    return aioble_compiled(mp, folder)


def aioble_compiled(mp: MicroPython, folder: Path) -> Path:
    """aioble's central part as ``.mpy`` in ``folder/aioble``, as ``mip install
    aioble-central`` puts it on a board."""
    source = aioble_source(mp)
    for name in AIOBLE_CENTRAL:
        mpy(mp, source / name, folder / "aioble" / name.replace(".py", ".mpy"))
    return folder


def fakes_compiled(mp: MicroPython, folder: Path) -> Path:
    """The fakes as ``.mpy``, as the modules they stand for are built into a board."""
    for fake in FAKES.glob("*.py"):
        mpy(mp, fake, folder / f"{fake.stem}.mpy")
    return folder


class Gateway:
    """drive_gateway.py as a child process, its stdout read line by line."""

    def __init__(
        self, mp: MicroPython, folder: Path, settings: dict[str, Any], heap_kib: int = HEAP_KIB
    ) -> None:
        self.fakes = folder / "fakes"
        self.fakes.mkdir(parents=True, exist_ok=True)
        code = folder / "code"
        compiled(mp, code)
        gateway_compiled(mp, code)
        env = micropython_env(fakes_compiled(mp, folder / "fakes-mpy"), code)
        env["FLEETLINE_FAKES"] = str(self.fakes)
        self.lines: list[str] = []
        (folder / "settings.json").write_text(json.dumps(settings))
        self.proc = subprocess.Popen(
            [str(mp.micropython), "-X", f"heapsize={heap_kib}K", str(DRIVER), "settings.json"],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def state(self) -> dict[str, Any]:
        for line in reversed(self.lines):
            if line.startswith("state "):
                state: dict[str, Any] = json.loads(line.removeprefix("state "))
                return state
        return {}

    def wait_state(
        self,
        check: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = STEP_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state and check(state):
                return state
            assert self.proc.poll() is None, f"the gateway exited waiting for {what}:\n{self}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self}"
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """Asked to stop (its children and itself say offline); its last counters."""
        (self.fakes / "stop").write_text("")
        code = self.proc.wait(RUN_TIMEOUT_SECONDS)
        self._reader.join(10)
        assert code == 0, str(self)
        result: dict[str, Any] = json.loads(
            next(line for line in self.lines if line.startswith("result ")).removeprefix("result ")
        )
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return "\n".join(line for line in self.lines if not line.startswith("state "))

    def __str__(self) -> str:
        return "\n".join(self.lines[-80:])


class Observer:
    """A client of the broker on ``devices/#``, standing in for the cloud side: what was
    published (with the retain flag), and requests published to the children."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"observer-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
        )
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("devices/#", qos=1)
        assert subscribed.wait(10), "the observer could not subscribe"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), message.retain))

    def on(self, device_id: str, kind: str, live_only: bool = True) -> list[bytes]:
        """What was published on ``devices/{device_id}/{kind}`` (live: not a retained
        copy the broker sent on subscribing)."""
        topic = f"devices/{device_id}/{kind}"
        with self._lock:
            return [
                p for t, p, retained in self.messages if t == topic and not (live_only and retained)
            ]

    def statuses(self, device_id: str) -> list[str]:
        return [p.decode() for p in self.on(device_id, "status")]

    def reported(self, device_id: str) -> dict[str, Any]:
        """The reported patches merged, as the twin would."""
        merged: dict[str, Any] = {}
        for payload in self.on(device_id, "twin/reported"):
            for name, value in json.loads(payload).items():
                if value is None:
                    merged.pop(name, None)
                else:
                    merged[name] = value
        return merged

    def readings(self, device_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for payload in self.on(device_id, "telemetry"):
            doc = json.loads(payload)
            out.extend(doc if isinstance(doc, list) else [doc])
        return out

    def ask(self, device_id: str, request_id: str, request: bytes | str) -> dict[str, Any]:
        """A method request on the child's topic; the gateway's answer."""
        self.client.publish(f"devices/{device_id}/methods/{request_id}/req", request, qos=1)
        answer = wait_until(
            lambda: self.on(device_id, f"methods/{request_id}/res"),
            timeout=10,
            what=f"the answer to {request_id}",
        )
        doc: dict[str, Any] = json.loads(answer[0])
        return doc

    def send(self, device_id: str, kind: str, payload: bytes | str) -> None:
        self.client.publish(f"devices/{device_id}/{kind}", payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def gateway_settings(gateway_id: str, port: int, **gateway: Any) -> dict[str, Any]:
    return {
        "device_id": gateway_id,
        "key": "-",
        "host": "127.0.0.1",
        "port": port,
        "auth": "key",
        "interval_s": 1,
        "gateway": {"offline_after_s": 2, "scan_ms": 1500, "child_interval_s": 0, **gateway},
    }


# -- the parser ----------------------------------------------------------------------


def test_bthome_adverts_are_read_under_micropython(
    micropython: MicroPython, tmp_path: Path
) -> None:
    """fleetline_bthome.py, compiled as it goes on a board, reads adverts built here
    byte by byte; each malformed one is refused with its reason, never anything else."""
    code = tmp_path / "code"
    mpy(micropython, COMMON / "fleetline_bthome.py", code / "fleetline_bthome.mpy")
    thermometer = advert(th(1, 21.37, 45.5, 87), "TH-1")
    cases: list[tuple[str, dict[str, Any]]] = [
        (
            thermometer,
            {
                "carries": True,
                "name": "TH-1",
                "values": {"packet_id": 1, "battery": 87, "temperature": 21.37, "humidity": 45.5},
                "unknown": None,
                "units": {"battery": "%", "temperature": "°C", "humidity": "%"},
            },
        ),
        (
            advert(th(255, -5.12, 99.99, 0)),
            {
                "carries": True,
                "name": None,
                "unknown": None,
                "values": {"packet_id": 255, "battery": 0, "temperature": -5.12, "humidity": 99.99},
            },
        ),
        # Voltage, window open, opening closed; pressure (3 bytes); a coarser temperature;
        # a count of 4 bytes.
        (
            advert(
                obj(0x0C, "<H", 3012)
                + obj(0x2D, "<B", 1)
                + obj(0x11, "<B", 0)
                + bytes([0x04])
                + (101325).to_bytes(3, "little")
                + obj(0x45, "<h", -123)
                + obj(0x3E, "<I", 4000000000)
            ),
            {
                "carries": True,
                "name": None,
                "unknown": None,
                "values": {
                    "voltage": 3.012,
                    "window": True,
                    "opening": False,
                    "pressure": 1013.25,
                    "temperature": -12.3,
                    "count": 4000000000,
                },
                # Booleans and counts have no unit; the coarser temperature has the other's.
                "units": {"voltage": "V", "pressure": "hPa", "temperature": "°C"},
            },
        ),
        # Every object with a unit, each once (zeros), and some without one: the unit of
        # each metric (the table a child's reported ``units`` comes from).
        (
            advert(
                b"".join(bytes([object_id]) + bytes(size) for object_id, size in EVERY_UNIT)
                + obj(0x00, "<B", 1)
                + obj(0x09, "<B", 2)
                + obj(0x15, "<B", 1)
                + obj(0x3A, "<B", 1)
            ),
            {
                "carries": True,
                "name": None,
                "unknown": None,
                "units": {
                    "battery": "%",
                    "temperature": "°C",
                    "humidity": "%",
                    "pressure": "hPa",
                    "illuminance": "lx",
                    "dewpoint": "°C",
                    "energy": "kWh",
                    "power": "W",
                    "voltage": "V",
                    "pm2_5": "µg/m³",
                    "pm10": "µg/m³",
                    "co2": "ppm",
                    "tvoc": "µg/m³",
                    "moisture": "%",
                    "rotation": "°",
                    "distance": "mm",
                    "current": "A",
                },
            },
        ),
        # An object id unknown here: what precedes it is read, nothing after.
        (
            advert(obj(0x01, "<B", 50) + bytes([0x77, 1, 2]) + obj(0x02, "<h", 100)),
            {
                "carries": True,
                "name": None,
                "values": {"battery": 50},
                "unknown": 0x77,
                "units": {"battery": "%"},
            },
        ),
        # Zero padding after the structures ends them.
        (
            bytes.fromhex(thermometer + "0000").hex(),
            {
                "carries": True,
                "name": "TH-1",
                "unknown": None,
                "values": {"packet_id": 1, "battery": 87, "temperature": 21.37, "humidity": 45.5},
            },
        ),
        (MALFORMED[0], {"carries": True, "name": None, "error": "decode: object 0x2 cut short"}),
        (MALFORMED[1], {"carries": True, "name": None, "error": "decode: encrypted"}),
        (MALFORMED[2], {"carries": True, "name": None, "error": "decode: not BTHome v2"}),
        (
            MALFORMED[3],
            {"carries": True, "name": None, "error": "ad: an AD structure runs past the end"},
        ),
        (MALFORMED[4], {"carries": True, "name": None, "error": "decode: no device information"}),
        (MALFORMED[5], {"carries": True, "name": None, "error": "decode: object 0x0 cut short"}),
        (FOREIGN[0], {"carries": False, "name": "phone", "data": None}),
        (FOREIGN[1], {"carries": False, "name": None, "data": None}),
        (
            FOREIGN[2],
            {"carries": False, "name": None, "error": "ad: an AD structure runs past the end"},
        ),
        # Service data of another 16-bit UUID (0x181A) is not BTHome's.
        (
            (FLAGS + ad(0x16, b"\x1a\x18\x01\x02")).hex(),
            {"carries": False, "name": None, "data": None},
        ),
        # A name that is not UTF-8 is no name; the readings are still read.
        (
            (FLAGS + ad(0x16, b"\xd2\xfc\x40" + obj(0x01, "<B", 9)) + ad(0x09, b"\xff\xfe")).hex(),
            {"carries": True, "name": None, "values": {"battery": 9}, "unknown": None},
        ),
    ]
    adverts = tmp_path / "adverts.json"
    adverts.write_text(json.dumps([advert_hex for advert_hex, _ in cases]))
    done = subprocess.run(
        [str(micropython.micropython), "-X", "heapsize=32K", str(BTHOME_DRIVER), str(adverts)],
        env=micropython_env(code),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(got) == len(cases), done.stdout
    for (advert_hex, expected), result in zip(cases, got, strict=True):
        for optional in ("data", "units", "values"):
            if optional not in expected:
                result.pop(optional, None)
        assert result == expected, advert_hex


# -- the gateway on a broker without the auth plugin ----------------------------------


def test_the_gateway_speaks_for_its_children_on_their_own_topics(
    micropython: MicroPython,
    broker: LocalMosquitto,
    tmp_path: Path,
    uid: str,
) -> None:
    """Three BTHome sensors, one that only sends malformed adverts and one that is no
    BTHome sensor: three children, each on its own topics (status, readings, reported
    properties, methods, messages, desired twin); a sensor that goes silent goes
    offline; a stopped gateway says its children offline."""
    t1, t2, t3, bad, other = macs(5)
    fakes = tmp_path / "gw" / "fakes"
    sensors = [
        sensor(
            t1,
            [advert(th(1, 21.37, 45.5, 87), "TH-1"), advert(th(2, 21.5, 46.0, 87), "TH-1")],
            rssi=-61,
        ),
        # Its second advert holds an object unknown here after the temperature.
        sensor(
            t2,
            [
                advert(th(7, -5.12, 99.99, 12), "TH-2"),
                advert(obj(0x00, "<B", 8) + obj(0x02, "<h", -400) + bytes([0x77, 0]), "TH-2"),
            ],
            rssi=-70,
            every_ms=400,
        ),
        sensor(t3, [advert(obj(0x0C, "<H", 3012) + obj(0x2D, "<B", 1), "DW-3")], rssi=-80),
        sensor(bad, MALFORMED, rssi=-50, every_ms=100),
        sensor(other, FOREIGN, rssi=-40, every_ms=100),
    ]
    write_scenario(fakes, sensors)
    gateway_id = f"{uid}-gw"
    children = [child_id(m) for m in (t1, t2, t3)]
    observer = Observer(broker.port)
    gw = Gateway(micropython, tmp_path / "gw", gateway_settings(gateway_id, broker.port))
    try:
        gw.wait_state(
            lambda s: s["online"] == 3 and s["readings_sent"] >= 6,
            "three children online and their readings sent",
        )
        for child in children:
            wait_until(
                lambda c=child: observer.statuses(c) == ["online"],
                timeout=10,
                what=f"{child} online",
            )
        # Their readings, each value exactly as the sensor sent it, with its own ts.
        wait_until(
            lambda: (
                len(observer.readings(children[0])) >= 2
                and len(observer.readings(children[1])) >= 2
            ),
            timeout=10,
            what="readings of both thermometers",
        )
        seen = {
            c: {json.dumps(r["values"], sort_keys=True) for r in observer.readings(c)}
            for c in children
        }
        assert seen == {
            children[0]: {
                json.dumps(v, sort_keys=True)
                for v in (
                    {"battery": 87, "temperature": 21.37, "humidity": 45.5},
                    {"battery": 87, "temperature": 21.5, "humidity": 46.0},
                )
            },
            children[1]: {
                json.dumps(v, sort_keys=True)
                for v in (
                    {"battery": 12, "temperature": -5.12, "humidity": 99.99},
                    {"temperature": -4.0},
                )
            },
            children[2]: {json.dumps({"voltage": 3.012, "window": True})},
        }
        assert all(isinstance(r["ts"], int) for c in children for r in observer.readings(c))
        assert observer.reported(children[0]) == {
            "mac": ":".join(t1[i : i + 2] for i in range(0, 12, 2)),
            "model": "TH-1",
            "battery": 87,
            "rssi": -61,
            "units": {"battery": "%", "temperature": "°C", "humidity": "%"},
        }
        assert observer.reported(children[2])["model"] == "DW-3"
        assert "battery" not in observer.reported(children[2])
        # Units once per child, for the metrics it sent (a window has none), not with
        # every reading.
        assert observer.reported(children[2])["units"] == {"voltage": "V"}
        for child in children:
            with_units = [p for p in observer.on(child, "twin/reported") if b'"units"' in p]
            assert len(with_units) == 1, (child, with_units)

        # Methods on a child's own topics.
        identify = observer.ask(children[0], "r1", json.dumps({"method": "identify"}))
        assert identify["status"] == 200, identify
        assert identify["payload"]["gateway"] == gateway_id
        assert identify["payload"]["rssi"] == -61 and identify["payload"]["online"] is True
        assert identify["payload"]["model"] == "TH-1" and identify["payload"]["battery"] == 87
        assert identify["payload"]["last_seen_s"] <= 2
        assert observer.ask(children[0], "r2", json.dumps({"method": "blink"}))["status"] == 404
        assert observer.ask(children[1], "r3", "not json")["status"] == 400
        listed = observer.ask(gateway_id, "r4", json.dumps({"method": "children"}))
        assert sorted(listed["payload"]["children"]) == sorted(children)

        # Cloud-to-device messages: acted on once, every delivery acknowledged; one
        # without an id is dropped.
        message = json.dumps({"id": "m1", "body": {"say": "hi"}})
        observer.send(children[1], "c2d", message)
        observer.send(children[1], "c2d", message)
        observer.send(children[1], "c2d", "[1]")
        wait_until(
            lambda: len(observer.on(children[1], "c2d/ack")) == 2,
            timeout=10,
            what="two acknowledgements",
        )
        assert [json.loads(a) for a in observer.on(children[1], "c2d/ack")] == [
            {"id": "m1", "outcome": "complete"}
        ] * 2
        assert gw.log().count("c2d to " + children[1] + ': {"say": "hi"}') == 1

        # A child's desired twin: applied, reported with what it could not apply. A
        # rollout reaching it (its desired firmware) is answered at once as the
        # rollout's own report: failed, with the reason.
        notification = {"rollout": 41, "id": 7, "version": "2.0.0", "kind": "bundle"}
        observer.send(
            children[2],
            "twin/desired",
            json.dumps(
                {
                    "version": 3,
                    "desired": {"interval_s": 5, "colour": "red", "firmware": notification},
                }
            ),
        )
        wait_until(
            lambda: observer.reported(children[2]).get("desired_version") == 3,
            timeout=10,
            what="the desired twin reported",
        )
        assert observer.reported(children[2])["interval_s"] == 5
        assert observer.reported(children[2])["desired_errors"] == {"colour": "unknown here"}
        assert observer.reported(children[2])["firmware"] == {
            "rollout": 41,
            "state": "failed",
            "progress": None,
            "version": "2.0.0",
            "running": None,
            "reason": f"a BLE sensor behind gateway {gateway_id}: it takes no firmware updates",
        }
        # The notification stays in the desired twin: a later change is not answered again.
        observer.send(
            children[2],
            "twin/desired",
            json.dumps({"version": 4, "desired": {"interval_s": 6, "firmware": notification}}),
        )
        wait_until(
            lambda: observer.reported(children[2]).get("desired_version") == 4,
            timeout=10,
            what="the desired twin reported again",
        )
        reports = [json.loads(r) for r in observer.on(children[2], "twin/reported")]
        assert sum("firmware" in r for r in reports) == 1, reports
        # A firmware member that is no rollout's notification is an error of the document.
        observer.send(
            children[2],
            "twin/desired",
            json.dumps({"version": 5, "desired": {"interval_s": 5, "firmware": "2.0.0"}}),
        )
        wait_until(
            lambda: observer.reported(children[2]).get("desired_version") == 5,
            timeout=10,
            what="the second desired twin reported",
        )
        assert observer.reported(children[2])["desired_errors"] == {
            "firmware": "firmware must be a rollout's notification, not '2.0.0'"
        }

        # The second thermometer goes silent: offline once not heard for 2 s.
        write_scenario(fakes, [s for s in sensors if s["addr"] != t2])
        wait_until(
            lambda: observer.statuses(children[1]) == ["online", "offline"],
            timeout=10,
            what=f"{children[1]} offline\n{gw}",
        )
        gw.wait_state(lambda s: s["online"] == 2, "two children online")
        # Malformed adverts, and adverts of no BTHome sensor: counted, no child, no error.
        state = gw.wait_state(
            lambda s: s["adverts_malformed"] >= 2 * len(MALFORMED), "malformed adverts counted"
        )
        assert state["children"] == 3 and state["errors"] == 0, state
        assert state["adverts_other"] >= 1 and state["adverts_partial"] >= 1, state
        assert not observer.on(child_id(bad), "status") and not observer.on(
            child_id(other), "status"
        )
        result = gw.stop()
    finally:
        gw.kill()
        observer.close()
    # Stopped: the children online said offline, then the gateway, before it left.
    for child in (children[0], children[2]):
        assert observer.statuses(child) == ["online", "offline"], observer.statuses(child)
    assert observer.statuses(gateway_id)[-1] == "offline"
    assert "Traceback" not in gw.log() and result["memory_errors"] == 0, gw.log()
    # The request that was not JSON and the message without an id.
    assert result["messages_bad"] == 2 and result["scan_errors"] == 0, result
    radio = result["fake_radio_module"] + fake_radio_scenario(fakes)
    REPORT.append(
        f"gateway, 3 children ({HEAP_KIB}K heap, .mpy, no TLS): live heap peak "
        f"{result['heap_peak'] - radio} bytes without the fake radio's {radio}, "
        f"{result['heap_after_imports'] - result['fake_radio_module']} after the imports; "
        f"{result['readings_sent']} "
        f"readings, {result['adverts_malformed']} malformed adverts counted"
    )


def test_children_are_bounded_and_readings_wait_out_an_outage(
    micropython: MicroPython,
    broker: LocalMosquitto,
    tmp_path: Path,
    uid: str,
) -> None:
    """At most ``max_children`` (2): a third sensor is ignored while both are online,
    and takes the place of one gone offline, whose topics are unsubscribed. While the
    broker is out of reach readings wait in a queue of ``queue_readings`` (10), the
    oldest dropped; after the reconnection every child is said online again and the
    queue goes out."""
    t1, t2, t3 = macs(3)
    fakes = tmp_path / "gw" / "fakes"
    s1 = sensor(t1, [advert(th(n, 20 + n / 100, 50, 90)) for n in range(1, 9)])
    s2 = sensor(t2, [advert(th(1, 18.0, 40, 80))])
    s3 = sensor(t3, [advert(th(1, 25.0, 30, 70))])
    write_scenario(fakes, [s1, s2])
    gateway_id = f"{uid}-gw"
    c1, c2, c3 = (child_id(m) for m in (t1, t2, t3))
    observer = Observer(broker.port)
    proxy = TcpProxy(("127.0.0.1", broker.port))
    proxy.up()
    gw = Gateway(
        micropython,
        tmp_path / "gw",
        gateway_settings(gateway_id, proxy.port, max_children=2, queue_readings=10),
    )
    try:
        gw.wait_state(lambda s: s["online"] == 2, "two children online")
        write_scenario(fakes, [s1, s2, s3])
        gw.wait_state(lambda s: s["sensors_ignored"] >= 1, "the third sensor ignored")
        assert gw.state()["children"] == 2
        # The second goes silent: offline, and the third takes its place.
        write_scenario(fakes, [s1, s3])
        wait_until(
            lambda: observer.statuses(c3) == ["online"],
            timeout=15,
            what=f"{c3} online in the place of {c2}\n{gw}",
        )
        assert observer.statuses(c2) == ["online", "offline"]
        assert gw.state()["children"] == 2
        bad = gw.state()["messages_bad"]
        observer.send(c2, "c2d", json.dumps({"id": "late", "body": 1}))
        observer.send(c3, "c2d", json.dumps({"id": "m3", "body": 1}))
        wait_until(lambda: observer.on(c3, "c2d/ack"), timeout=10, what=f"{c3}'s ack")
        # Let go and unsubscribed: the message to it never reached the gateway.
        assert not observer.on(c2, "c2d/ack") and gw.state()["messages_bad"] == bad

        # The broker out of reach: readings pile up, the queue keeps the newest 10.
        proxy.down()
        gw.wait_state(lambda s: not s["connected"], "the connection lost")
        sent = gw.state()["readings_sent"]
        state = gw.wait_state(lambda s: s["readings_dropped"] >= 5, "the queue overflowing")
        assert state["queue"] == 10, state
        online_before = {c: observer.statuses(c).count("online") for c in (c1, c3)}
        proxy.up()
        state = gw.wait_state(
            lambda s: s["connected"] and s["queue"] == 0 and s["readings_sent"] >= sent + 10,
            "the queue sent",
        )
        assert state["connects"] == 2, state
        for c in (c1, c3):  # said online again after the reconnection
            wait_until(
                lambda c=c: observer.statuses(c).count("online") > online_before[c],
                timeout=10,
                what=f"{c} online again",
            )
        result = gw.stop()
    finally:
        gw.kill()
        proxy.down()
        observer.close()
    assert result["memory_errors"] == 0 and result["errors"] == 0, result
    assert "Traceback" not in gw.log(), gw.log()


def test_32_children_and_a_full_queue_stay_within_their_bounds(
    micropython: MicroPython,
    broker: LocalMosquitto,
    tmp_path: Path,
    uid: str,
) -> None:
    """40 sensors around the gateway, its defaults (32 children, 100 queued readings):
    32 children online, the others ignored; an outage fills the queue, which goes out
    after it. The live heap is measured throughout; what the fake radio keeps (its
    module, its scenario) is taken out of the figure, as a board keeps it outside
    MicroPython's heap."""
    addresses = macs(40)
    fakes = tmp_path / "gw" / "fakes"
    write_scenario(
        fakes,
        [
            sensor(
                mac,
                [
                    advert(th(n, 20 + i / 10 + n / 100, 40 + i, 50 + i), f"TH-{i}")
                    for n in range(1, 4)
                ],
                rssi=-40 - i,
                every_ms=500,
            )
            for i, mac in enumerate(addresses)
        ],
    )
    proxy = TcpProxy(("127.0.0.1", broker.port))
    proxy.up()
    settings = gateway_settings(
        f"{uid}-gw", proxy.port, offline_after_s=60, scan_ms=5000, child_interval_s=1
    )
    settings["sample_ms"] = 200
    gw = Gateway(micropython, tmp_path / "gw", settings, heap_kib=CROWD_HEAP_KIB)
    try:
        gw.wait_state(
            lambda s: s["online"] == 32 and s["sensors_ignored"] > 0,
            "32 children online, the others ignored",
        )
        proxy.down()
        gw.wait_state(
            lambda s: not s["connected"] and s["readings_dropped"] > 0,
            "a full queue offline",
            timeout=60,
        )
        sent = gw.state()["readings_sent"]
        proxy.up()
        gw.wait_state(
            lambda s: s["connected"] and s["online"] == 32 and s["readings_sent"] >= sent + 100,
            "the queue sent",
        )
        result = gw.stop()
    finally:
        gw.kill()
        proxy.down()
    assert result["children"] == 32 and result["memory_errors"] == 0, result
    assert result["errors"] == 0 and "Traceback" not in gw.log(), gw.log()
    # The peak came with the bounds reached: 32 children, a full queue.
    assert result["at_peak"]["children"] == 32, result["at_peak"]
    radio = result["fake_radio_module"] + fake_radio_scenario(fakes)
    peak = result["heap_peak"] - radio
    imports = result["heap_after_imports"] - result["fake_radio_module"]
    REPORT.append(
        f"gateway, 32 children of 40 sensors and a full 100-reading queue (.mpy, no TLS, "
        f"{CROWD_HEAP_KIB}K heap): live heap peak {peak} bytes without the fake radio's "
        f"{radio}, {imports} after the imports; at the peak {result['at_peak']}"
    )


# -- the ESP32 application as a gateway, on the real stack ----------------------------


@pytest.fixture(scope="module")
async def backend(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "gateway") as served:
        yield served


@pytest.fixture(scope="module")
def gateway_build(micropython: MicroPython, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fleetline firmware build` for the ESP32 (the gateway's modules in it), then
    aioble's central part beside it (`mip install aioble-central` on a board)."""
    out = build(micropython, tmp_path_factory.mktemp("gateway-build") / "esp32", "esp32")
    return aioble_compiled(micropython, out)


async def test_the_esp32_application_as_a_gateway_on_the_real_stack(
    micropython: MicroPython,
    gateway_build: Path,
    backend: Backend,
    tls_files: TlsFiles,
    tmp_path: Path,
    uid: str,
) -> None:
    """A board configured as a gateway (boot.py, main.py; TLS, a SAS token), registered
    with a policy that creates its children; three BTHome sensors and malformed adverts
    around it. Through the real broker's auth plugin, ingest and API: the children are
    created with their parent and tags, their readings stored exactly, their status
    online; a method and a message to a child are served by the gateway; a sensor gone
    silent goes offline; the gateway killed (SIGKILL), its children go offline because
    of it."""
    c = httpx.Client(
        base_url=backend.api.url, timeout=30, headers={"Authorization": f"Bearer {backend.key}"}
    )
    gateway_id = f"{uid}-gw"
    created = c.post(
        "/v1/devices",
        json={
            "id": gateway_id,
            "gateway": {
                "create_children": True,
                "child_id_pattern": "ble-[0-9a-f]{12}",
                "child_tags": {"kind": "ble"},
            },
        },
    )
    assert created.status_code == 201, created.text
    connection_string = created.json()["credentials"]["connection_string"]
    t1, t2, t3, bad = macs(4)
    children = [child_id(m) for m in (t1, t2, t3)]
    sensors = [
        sensor(
            t1,
            [advert(th(1, 21.37, 45.5, 87), "TH-1"), advert(th(2, 21.5, 46.0, 87), "TH-1")],
            rssi=-61,
            every_ms=500,
        ),
        sensor(t2, [advert(th(7, -5.12, 99.99, 12), "TH-2")], rssi=-70, every_ms=500),
        sensor(
            t3, [advert(obj(0x0C, "<H", 3012) + obj(0x2D, "<B", 1), "DW-3")], rssi=-80, every_ms=500
        ),
        sensor(bad, MALFORMED + FOREIGN, rssi=-50, every_ms=100),
    ]
    folder = tmp_path / "board"
    write_scenario(folder / "fakes", sensors)
    config = firmware.config_text(
        connection_string=connection_string,
        wifi_ssid="test",
        wifi_password="-",
        ca_file=firmware.CA_NAME,
        interval_s=1,
        extra={
            "GATEWAY": True,
            "GATEWAY_OFFLINE_AFTER_S": 3,
            "GATEWAY_CHILD_INTERVAL_S": 0,
            "GATEWAY_SCAN_MS": 2000,
            "WATCHDOG_S": 20,
            "SOCKET_TIMEOUT_S": 3,
        },
    )
    started = time.monotonic()
    board = Board(micropython, gateway_build, folder, config, tls_files, heap_kib=APP_HEAP_KIB)

    def device(device_id: str) -> dict[str, Any]:
        shown = c.get(f"/v1/devices/{device_id}")
        assert shown.status_code == 200, shown.text
        doc: dict[str, Any] = shown.json()
        return doc

    def listed() -> list[dict[str, Any]]:
        page = c.get("/v1/devices", params={"parent": gateway_id})
        assert page.status_code == 200, page.text
        items: list[dict[str, Any]] = page.json()["items"]
        return items

    try:
        wait_until(
            lambda: len(listed()) == 3 and all(device(ch)["online"] for ch in children),
            timeout=45,
            what=f"three children online\n{board.console()[-3000:]}",
        )
        assert sorted(d["id"] for d in listed()) == sorted(children)
        for ch in children:
            shown = device(ch)
            assert shown["parent"] == gateway_id and shown["tags"] == {"kind": "ble"}, shown
        assert device(gateway_id)["gateway"]["create_children"] is True

        # Readings stored, each value as the sensor sent it.
        async def stored(device_id: str, metric: str) -> set[float]:
            rows = await backend.db.fetch(
                "SELECT value FROM readings WHERE device_id = $1 AND metric = $2", device_id, metric
            )
            return {r["value"] for r in rows}

        deadline = time.monotonic() + 30
        while await stored(children[0], "temperature") != {21.37, 21.5}:
            assert time.monotonic() < deadline, await stored(children[0], "temperature")
            await asyncio.sleep(0.2)
        assert await stored(children[0], "humidity") == {45.5, 46.0}
        assert await stored(children[0], "battery") == {87.0}
        wait_until(
            lambda: (
                c.get(f"/v1/devices/{children[1]}/latest").json().get("metrics", {}).get("humidity")
            ),
            timeout=20,
            what="TH-2's readings",
        )
        assert await stored(children[1], "temperature") == {-5.12}
        assert await stored(children[1], "humidity") == {99.99}
        wait_until(
            lambda: (
                c.get(f"/v1/devices/{children[2]}/latest").json().get("metrics", {}).get("voltage")
            ),
            timeout=20,
            what="DW-3's readings",
        )
        assert await stored(children[2], "voltage") == {3.012}
        assert await stored(children[2], "window") == {1.0}
        twin = wait_until(
            lambda: (
                (t := c.get(f"/v1/devices/{children[0]}/twin").json())["reported"].get("model")
                and t
            ),
            timeout=20,
            what="TH-1's twin",
        )
        assert twin["reported"]["battery"] == 87 and twin["reported"]["rssi"] == -61
        # Each child's units, as the dashboard reads them: the degree sign arrived whole.
        for ch, units in (
            (children[0], {"battery": "%", "temperature": "°C", "humidity": "%"}),
            (children[1], {"battery": "%", "temperature": "°C", "humidity": "%"}),
            (children[2], {"voltage": "V"}),
        ):
            wait_until(
                lambda ch=ch, units=units: (
                    c.get(f"/v1/devices/{ch}/twin").json()["reported"].get("units") == units
                ),
                timeout=20,
                what=f"{ch}'s units: {c.get(f'/v1/devices/{ch}/twin').json()['reported']}",
            )

        # A method on a child through the REST API, answered by the gateway.
        answer = c.post(f"/v1/devices/{children[0]}/methods/identify", json={"timeout_s": 15})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == 200, answer.text
        identified = answer.json()["payload"]
        assert identified["gateway"] == gateway_id and identified["rssi"] == -61
        unknown = c.post(f"/v1/devices/{children[0]}/methods/blink", json={"timeout_s": 15})
        assert unknown.json()["status"] == 404, unknown.text

        # A message to a child: acknowledged by the gateway, completed.
        posted = c.post(f"/v1/devices/{children[1]}/messages", json={"body": {"say": "hi"}})
        assert posted.status_code == 201, posted.text
        message_url = f"/v1/devices/{children[1]}/messages/{posted.json()['id']}"
        wait_until(
            lambda: c.get(message_url).json()["state"] == "completed",
            timeout=30,
            what=f"the message completed: {c.get(message_url).text}",
        )

        # A child's desired twin, applied by the gateway.
        assert c.patch(f"/v1/devices/{children[2]}/twin", json={"interval_s": 2}).status_code == 200
        wait_until(
            lambda: (
                (t := c.get(f"/v1/devices/{children[2]}/twin").json())["delta"] == {}
                and t["reported"].get("interval_s") == 2
            ),
            timeout=30,
            what="the child's desired interval reported",
        )

        # A rollout over the gateway's children: each fails at once, with the gateway's
        # reason (not a timeout: the phases are given 10 minutes).
        image = b"a release no BLE sensor takes" * 10
        made = c.post(
            "/v1/firmware",
            json={
                "version": "2.0.0",
                "target": f"ble-{uid}",
                "kind": "image",
                "size": len(image),
                "sha256": hashlib.sha256(image).hexdigest(),
            },
        )
        assert made.status_code == 201, made.text
        uploaded = c.put(
            f"/v1/firmware/{made.json()['id']}/content",
            content=image,
            headers={
                "Content-Range": f"bytes 0-{len(image) - 1}/{len(image)}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert uploaded.status_code == 200, uploaded.text
        rolled = time.monotonic()
        job = c.post(
            "/v1/jobs",
            json={
                "type": "rollout",
                "query": f"parent = '{gateway_id}'",
                "firmware_id": made.json()["id"],
                "canary": 3,
                "failure_threshold_percent": 100.0,
                "timeouts": {"notified": 600},
            },
        )
        assert job.status_code in (200, 201, 202), job.text
        job_id = job.json()["id"]
        finished = wait_until(
            lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["finished_at"] and j,
            timeout=30,
            what=f"the rollout finished: {c.get(f'/v1/jobs/{job_id}/devices').text}",
        )
        rollout_s = time.monotonic() - rolled
        rows = c.get(f"/v1/jobs/{job_id}/devices").json()["items"]
        assert sorted(r["device_id"] for r in rows) == sorted(children), rows
        reason = f"a BLE sensor behind gateway {gateway_id}: it takes no firmware updates"
        for row in rows:
            assert row["state"] == "failed" and row["error"] == reason, row
        assert finished["progress"].get("failed") == 3, finished
        reported = c.get(f"/v1/devices/{children[0]}/twin").json()["reported"]
        assert reported["firmware"]["state"] == "failed", reported
        assert "firmware" not in (reported.get("desired_errors") or {}), reported

        # The third sensor goes silent: offline by its own status, no reason given.
        write_scenario(folder / "fakes", [s for s in sensors if s["addr"] != t3])
        wait_until(
            lambda: not device(children[2])["online"],
            timeout=20,
            what=f"{children[2]} offline\n{board.console()[-2000:]}",
        )
        assert device(children[2])["offline_reason"] is None

        # Malformed adverts counted (the gateway's own readings); no child came of them.
        wait_until(
            lambda: (
                (
                    c.get(f"/v1/devices/{gateway_id}/latest")
                    .json()
                    .get("metrics", {})
                    .get("adverts_malformed")
                    or {}
                ).get("value", 0)
                > 0
            ),
            timeout=20,
            what="malformed adverts counted",
        )
        assert c.get(f"/v1/devices/{child_id(bad)}").status_code == 404
        assert len(listed()) == 3
        assert board.proc.poll() is None, board.console()[-3000:]

        # The gateway killed: its children online go offline because of it.
        board.kill()
        for ch in children[:2]:
            wait_until(
                lambda ch=ch: not device(ch)["online"],
                timeout=30,
                what=f"{ch} offline after the gateway",
            )
            assert gateway_id in device(ch)["offline_reason"], device(ch)
        assert not device(gateway_id)["online"]
        assert device(children[2])["offline_reason"] is None
    finally:
        board.kill()
    console = board.console()
    assert "Traceback" not in console and "MemoryError" not in console, console[-3000:]
    free = [
        r["value"]
        for r in await backend.db.fetch(
            "SELECT value FROM readings WHERE device_id = $1 AND metric = 'mem_free'", gateway_id
        )
    ]
    REPORT.append(
        f"esp32 application as a gateway over TLS ({APP_HEAP_KIB}K heap): 3 children, "
        f"{time.monotonic() - started:.0f} s; the least free heap a reading reported "
        f"{min(free):,.0f} bytes; a rollout over its children failed them in {rollout_s:.1f} s"
    )
