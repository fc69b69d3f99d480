"""The ESP32 application itself on real MicroPython: the files that go on the board.

`fleetline firmware build` compiles the application (the device core, the TLS-capable
umqtt.simple wrapper and the ESP32 board layer as ``.mpy``; ``boot.py`` and ``main.py`` as
source) with the unix port's own mpy-cross. The unix port (``-X heapsize=110K``, what an
ESP32 app has free) then runs ``boot.py`` and ``main.py`` as a board does at power-on,
with a ``config_local.py`` written by the same code as `fleetline firmware config`, over
TLS to the real broker with the auth plugin, verifying it against the CA. Only what the
unix port has no hardware for is faked (``tests/firmware/fakes``: ``machine``, ``network``,
``ntptime``). A real ingest and API serve the device: readings are stored, a desired
twin change is applied and reported, a cloud-to-device message completed, and the
``reboot`` method ends the run through ``machine.reset``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization

from fleetline import devicekeys
from fleetline_cli import firmware
from fleetline_dev import certs
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import LocalMosquitto
from tests.firmware.conftest import (
    API_USER,
    REPORT,
    SERVICES,
    MicroPython,
    mpy,
    umqtt_compiled,
)
from tests.firmware.test_unix_port import micropython_env
from tests.stack import Backend, serve_stack
from tests.support import ApiProcess, TcpProxy, wait_until

ROOT = Path(__file__).resolve().parents[2]


def fleetline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `fleetline` command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fleetline_cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})

pytestmark = pytest.mark.integration

FAKES = Path(__file__).with_name("fakes")
# What `fleetline firmware build` writes.
APPLICATION = {
    "fleetline_device.mpy", "fleetline_umqtt.mpy", "fleetline_board.mpy",
    "fleetline_provision.mpy", "fleetline_boot.mpy", "fleetline_ota.mpy", "fleetline_https.mpy",
    "fleetline_upload.mpy", "fleetline_transfers.mpy",
    "fleetline_release.mpy", "fleetline_ecdsa.mpy", "board.mpy", "boot.py", "main.py"}
# The ESP32's build also holds the BLE gateway.
BOARD_APPLICATION = {"esp32": {"fleetline_gateway.mpy", "fleetline_bthome.mpy"}}
HEAP_KIB = 110
RUN_TIMEOUT_SECONDS = 120


def build(mp: MicroPython, out: Path, board: str) -> Path:
    """`fleetline firmware build --board BOARD`, and umqtt.simple as `mip install` puts it
    on a board (a board's MicroPython firmware usually has it frozen in)."""
    done = fleetline("firmware", "build", "--board", board, "--out", str(out),
                     "--mpy-cross", str(mp.mpy_cross))
    assert done.returncode == 0, done.stderr
    assert "mpy-cross emitting mpy v6" in done.stdout
    assert {p.name for p in out.iterdir()} == APPLICATION | BOARD_APPLICATION.get(board, set())
    umqtt_compiled(mp, out)
    return out


@pytest.fixture(scope="module")
def board_build(micropython: MicroPython, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(micropython, tmp_path_factory.mktemp("esp32-build") / "esp32", "esp32")


@pytest.fixture(scope="module")
async def backend(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "board") as served:
        yield served


class Board:
    """One board: its filesystem (the build, its config and CA file), powered on by
    running ``boot.py`` then ``main.py``; the fakes' files say what happened."""

    def __init__(self, mp: MicroPython, build: Path, folder: Path, config: str,
                 tls: TlsFiles, heap_kib: int = HEAP_KIB) -> None:
        self.folder = folder
        self.fakes = folder / "fakes"
        self.fakes.mkdir(parents=True, exist_ok=True)
        (folder / firmware.CONFIG_NAME).write_text(config)
        shutil.copyfile(tls.ca_cert, folder / firmware.CA_NAME)
        self.log_path = folder / "console.log"
        # The fakes compiled, as the modules they stand for are built into a board's
        # firmware (compiling them at import would take heap a board does not spend).
        fakes_mpy = folder / "fakes-mpy"
        for fake in FAKES.glob("*.py"):
            mpy(mp, fake, fakes_mpy / f"{fake.stem}.mpy")
        self.env = micropython_env(fakes_mpy, folder, build)
        self.env["FLEETLINE_FAKES"] = str(self.fakes)
        self.command = [str(mp.micropython), "-X", f"heapsize={heap_kib}K", "-c",
                        "import boot\nimport main"]
        self.power_on()

    def power_on(self) -> None:
        """boot.py, then main.py, on the board's filesystem as it is (a reset keeps it)."""
        self.proc = subprocess.Popen(self.command, cwd=self.folder, env=self.env,
                                     stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[str]:
        try:
            return (self.fakes / "events").read_text().split()
        except OSError:
            return []

    def longest_unfed_ms(self) -> int:
        return int((self.fakes / "wdt_longest_ms").read_text())

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(RUN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the board did not stop:\n{self.console()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _client(api: ApiProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def _reboot(c: httpx.Client, device_id: str, board: Board) -> None:
    """The `reboot` method over the API: answered, then machine.reset() ends the run."""
    answer = c.post(f"/v1/devices/{device_id}/methods/reboot", json={"timeout_s": 15})
    assert answer.status_code == 200, answer.text
    assert board.wait_exit() == 0, board.console()[-3000:]


def _register(c: httpx.Client, device_id: str) -> dict[str, Any]:
    """Register a device over REST; its credentials (key, connection string)."""
    created = c.post("/v1/devices", json={"id": device_id})
    assert created.status_code == 201, created.text
    credentials: dict[str, Any] = created.json()["credentials"]
    return credentials


async def _readings(db: asyncpg.Pool[Any], device_id: str, metric: str) -> list[Any]:
    return await db.fetch(
        "SELECT time, value FROM readings WHERE device_id = $1 AND metric = $2 ORDER BY time",
        device_id, metric)


async def test_the_esp32_application_runs_over_tls_against_the_real_services(
    micropython: MicroPython, board_build: Path, backend: Backend, tls_files: TlsFiles,
    tmp_path: Path, uid: str,
) -> None:
    c = _client(backend.api, backend.key)
    db = backend.db
    device_id = f"{uid}-esp32"
    connection_string = _register(c, device_id)["connection_string"]
    assert f"Port={backend.broker.tls_port};" in connection_string  # the TLS listener
    config = firmware.config_text(
        connection_string=connection_string, wifi_ssid="test", wifi_password="-",
        ca_file=firmware.CA_NAME, interval_s=0.5,
        extra={"ADC_PIN": 34, "DHT_PIN": 4, "WATCHDOG_S": 20, "SOCKET_TIMEOUT_S": 3})
    fakes = tmp_path / "board" / "fakes"
    fakes.mkdir(parents=True)
    (fakes / "adc").write_text("12345")
    (fakes / "dht").write_text("22.5 55.0")  # a DHT22 on pin 4
    board = Board(micropython, board_build, tmp_path / "board", config, tls_files)
    try:
        wait_until(lambda: c.get(f"/v1/devices/{device_id}/latest").json()
                   .get("metrics", {}).get("adc"), timeout=30,
                   what=f"the board's readings\n{board.console()[-2000:]}")
        assert c.get(f"/v1/devices/{device_id}").json()["online"]

        # The desired twin: applied and reported.
        patched = c.patch(f"/v1/devices/{device_id}/twin", json={"interval_s": 1})
        assert patched.status_code == 200, patched.text
        twin = wait_until(
            lambda: (t := c.get(f"/v1/devices/{device_id}/twin").json())["delta"] == {}
            and t["reported"].get("interval_s") == 1 and t, timeout=30,
            what="the desired interval reported")
        assert twin["reported"]["platform"] == "esp32"
        assert twin["reported"]["units"] == {"uptime_s": "s", "mem_free": "B", "mcu_temp": "°C",
                                             "rssi": "dBm", "temperature": "°C", "humidity": "%"}

        # A cloud-to-device message, completed by the board.
        posted = c.post(f"/v1/devices/{device_id}/messages", json={"body": {"say": "hello"}})
        assert posted.status_code == 201, posted.text
        message_id = posted.json()["id"]
        message_url = f"/v1/devices/{device_id}/messages/{message_id}"
        wait_until(lambda: c.get(message_url).json()["state"] == "completed", timeout=30,
                   what=f"the message completed: {c.get(message_url).text}\n{board.console()}")
        assert '"say": "hello"' in board.console()

        # A few more readings at the new interval, then reboot: answered, then
        # machine.reset ends the run.
        count = "SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'adc'"
        seen = await db.fetchval(count, device_id)
        deadline = time.monotonic() + 30
        while await db.fetchval(count, device_id) < seen + 4:
            assert time.monotonic() < deadline, board.console()[-2000:]
            await asyncio.sleep(0.2)
        answer = c.post(f"/v1/devices/{device_id}/methods/reboot", json={"timeout_s": 15})
        assert answer.status_code == 200 and answer.json()["status"] == 200, answer.text
        assert board.wait_exit() == 0, board.console()[-3000:]
        assert board.events() == ["reset"]
    finally:
        board.kill()
    console = board.console()
    assert "Traceback" not in console and "MemoryError" not in console, console[-3000:]
    adc = await _readings(db, device_id, "adc")
    assert adc and {r["value"] for r in adc} == {12345.0}
    assert {r["value"] for r in await _readings(db, device_id, "temperature")} == {22.5}
    assert {r["value"] for r in await _readings(db, device_id, "humidity")} == {55.0}
    free = [r["value"] for r in await _readings(db, device_id, "mem_free")]
    REPORT.append(
        f"esp32 application over TLS, {HEAP_KIB} KiB heap: {len(adc)} readings, the least "
        f"free heap a reading reported {min(free):,.0f} bytes (uncollected garbage counts "
        "as used: the collector runs when an allocation needs it)"
    )


async def test_the_esp32_application_provisions_itself_then_runs(
    micropython: MicroPython, board_build: Path, backend: Backend, tls_files: TlsFiles,
    tmp_path: Path, uid: str,
) -> None:
    """First boot: the board registers itself through a symmetric-key group (with its
    own registration key, as `fleetline firmware config --enrollment` writes it), keeps
    the answer in flash, connects with the key it was given and publishes. The next boot
    uses what it kept, without registering."""
    c = _client(backend.api, backend.key)
    created = c.post("/v1/enrollments", json={
        "id": uid, "kind": "group", "attestation": "symmetric_key",
        "registration_pattern": "esp32-[0-9a-f]{12}", "initial_tags": {"fleet": uid},
        "initial_desired": {"interval_s": 1}})
    assert created.status_code == 201, created.text
    device_id = f"esp32-{secrets.token_hex(6)}"
    config = firmware.config_text(
        connection_string="", wifi_ssid="test", wifi_password="-", ca_file=firmware.CA_NAME,
        interval_s=0.5,
        extra={"ENROLLMENT": uid, "REGISTRATION_ID": device_id,
               "REGISTRATION_KEY": devicekeys.registration_key(created.json()["key"], device_id),
               "PROVISIONING_HOST": "127.0.0.1",
               "PROVISIONING_PORT": backend.broker.tls_port, "WATCHDOG_S": 20})
    assert created.json()["key"] not in config  # the group key stays off the board
    board = Board(micropython, board_build, tmp_path / "board", config, tls_files)
    try:
        wait_until(lambda: c.get(f"/v1/devices/{device_id}/latest").json()
                   .get("metrics", {}).get("mem_free"), timeout=30,
                   what=f"the provisioned board's readings\n{board.console()[-2000:]}")
        shown = c.get(f"/v1/devices/{device_id}").json()
        assert shown["tags"] == {"fleet": uid} and shown["online"]
        # Its initial desired twin reached it: reported back.
        wait_until(lambda: c.get(f"/v1/devices/{device_id}/twin").json()["reported"]
                   .get("interval_s") == 1, timeout=30, what="the initial desired twin applied")
        kept = json.loads((tmp_path / "board" / "provisioned.json").read_text())
        assert kept["device_id"] == device_id and kept["port"] == backend.broker.tls_port
        _reboot(c, device_id, board)
        board.power_on()  # the next boot: what it kept, no registration
        wait_until(lambda: board.console().count("connected as " + device_id) == 2
                   and c.get(f"/v1/devices/{device_id}").json()["online"],
                   timeout=30, what=f"the second boot connected\n{board.console()[-2000:]}")
        _reboot(c, device_id, board)
    finally:
        board.kill()
    console = board.console()
    assert "Traceback" not in console, console[-3000:]
    assert console.count("provisioning: registering") == 1, console
    registrations = c.get(f"/v1/enrollments/{uid}/registrations").json()["items"]
    assert [(r["registration_id"], r["attempts"]) for r in registrations] == [(device_id, 1)]


async def test_the_esp32_application_provisions_itself_with_a_certificate(
    micropython: MicroPython, board_build: Path, backend: Backend, tls_files: TlsFiles,
    tmp_path: Path, uid: str,
) -> None:
    """An X.509 group: the board's certificate (signed by the group's verified CA, its
    registration id as common name) is its credential, to provision and then to log in."""
    c = _client(backend.api, backend.key)
    ca, ca_key = certs.make_ca(tmp_path / "ca", name=f"{uid} devices")
    added = c.post("/v1/cas", json={"name": uid, "certificate": certs.cert_pem(ca).decode()})
    assert added.status_code == 201, added.text
    proof, _ = certs.issue(ca, ca_key, added.json()["verification_code"], client=True)
    assert c.post(f"/v1/cas/{uid}/verify",
                  json={"certificate": certs.cert_pem(proof).decode()}).status_code == 200
    assert c.post("/v1/enrollments", json={"id": uid, "kind": "group", "attestation": "x509",
                                           "ca": uid}).status_code == 201
    device_id = f"{uid}-cam"
    cert, key = certs.issue(ca, ca_key, device_id, client=True)
    folder = tmp_path / "board"
    folder.mkdir()
    (folder / "device.crt").write_bytes(certs.cert_pem(cert))
    (folder / "device.key").write_bytes(certs.key_pem(key))
    config = firmware.config_text(
        connection_string="", wifi_ssid="test", wifi_password="-", ca_file=firmware.CA_NAME,
        interval_s=0.5,
        extra={"ENROLLMENT": uid, "REGISTRATION_ID": device_id, "CERT_FILE": "device.crt",
               "KEY_FILE": "device.key", "PROVISIONING_HOST": "127.0.0.1",
               "PROVISIONING_PORT": backend.broker.tls_port})
    board = Board(micropython, board_build, folder, config, tls_files)
    try:
        wait_until(lambda: c.get(f"/v1/devices/{device_id}/latest").json()
                   .get("metrics", {}).get("mem_free"), timeout=30,
                   what=f"the X.509 board's readings\n{board.console()[-2000:]}")
        assert c.get(f"/v1/devices/{device_id}").json()["auth"]["type"] == "x509_ca"
        _reboot(c, device_id, board)
    finally:
        board.kill()
    assert "Traceback" not in board.console(), board.console()[-3000:]


async def test_wifi_drop_and_silent_link_keep_sampling_and_lose_nothing(
    micropython: MicroPython, board_build: Path, backend: Backend, tls_files: TlsFiles,
    tmp_path: Path, uid: str,
) -> None:
    """The Wi-Fi goes (the link cut with it), then a silent link (the connection open,
    nothing through): the board notices within its socket timeout, keeps taking readings
    into its backlog, feeds the watchdog, reconnects and sends every reading once."""
    c = _client(backend.api, backend.key)
    db = backend.db
    device_id = f"{uid}-esp32"
    key = _register(c, device_id)["key"]
    proxy = TcpProxy(("127.0.0.1", backend.broker.tls_port or 0))
    proxy.up()
    interval_s, timeout_s = 0.5, 2
    config = firmware.config_text(
        connection_string=f"HostName=127.0.0.1;Port={proxy.port};DeviceId={device_id};"
                          f"SharedAccessKey={key}",
        wifi_ssid="test", wifi_password="-", ca_file=firmware.CA_NAME, interval_s=interval_s,
        extra={"WATCHDOG_S": 10, "SOCKET_TIMEOUT_S": timeout_s})
    board = Board(micropython, board_build, tmp_path / "board", config, tls_files)

    def online() -> bool:
        return bool(c.get(f"/v1/devices/{device_id}").json()["online"])

    try:
        wait_until(online, timeout=30, what=f"the board online\n{board.console()[-2000:]}")
        # The Wi-Fi drops, and the link with it.
        (board.fakes / "wifi_down").write_text("")
        proxy.down()
        wait_until(lambda: not online(), timeout=30, what="the board seen offline")
        time.sleep(2)  # four readings into the backlog
        (board.fakes / "wifi_down").unlink()
        proxy.up()
        wait_until(online, timeout=30, what="the board back online")
        time.sleep(1)
        # A silent link: nothing gets through, nothing is closed.
        proxy.freeze()
        wait_until(lambda: "connection lost" in board.console().split("connected as")[-1],
                   timeout=4 * timeout_s + 5, what="the silent link noticed")
        time.sleep(2)
        proxy.thaw()
        reconnects = board.console().count("connected as")
        wait_until(lambda: board.console().count("connected as") > reconnects, timeout=30,
                   what="the board reconnected after the silent link")
        time.sleep(2)
        _reboot(c, device_id, board)
    finally:
        board.kill()
        proxy.down()
    console = board.console()
    assert "Traceback" not in console, console[-3000:]
    # Sampling never stopped for long: the readings' own times have no hole wider than a
    # connection attempt's timeout plus two intervals, outage and silent link included.
    uptimes = await _readings(db, device_id, "uptime_s")
    times = [r["time"] for r in uptimes]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) <= timedelta(seconds=timeout_s + 2 * interval_s), (max(gaps), console[-3000:])
    assert board.longest_unfed_ms() < 10_000
    free = [r["value"] for r in await _readings(db, device_id, "mem_free")]
    REPORT.append(
        f"esp32 application, Wi-Fi drop and silent link: {len(times)} readings stored, the "
        f"widest hole between their times {max(gaps).total_seconds():.2f} s, the watchdog "
        f"unfed at most {board.longest_unfed_ms()} ms, the least free heap a reading "
        f"reported {min(free):,.0f} bytes"
    )


def test_firmware_config_and_flash_commands(
    board_build: Path, tls_files: TlsFiles, tmp_path: Path
) -> None:
    """`fleetline firmware config` writes what the board reads (checked by running it in
    the test above, here its refusals and file modes); `flash` copies build and config
    with mpremote. No board is attached here: flash runs with --dry-run, which prints
    the mpremote command it would run."""
    key = "A" * 43 + "="
    out = tmp_path / "cfg"
    base = ["firmware", "config", "dev-1", "--wifi-ssid", "home", "--out", str(out)]
    env = {"FLEETLINE_WIFI_PASSWORD": "pw"}
    refused = fleetline(*base, "--key", key, "--mqtt-url", "mqtts://b.example:8883", env=env)
    assert refused.returncode == 2 and "--ca-file" in refused.stderr
    no_url = fleetline(*base, "--key", key, "--ca-file", str(tls_files.ca_cert), env=env)
    assert no_url.returncode == 2 and "--mqtt-url" in no_url.stderr
    done = fleetline(*base, "--key", key, "--mqtt-url", "mqtts://b.example:8883",
                     "--ca-file", str(tls_files.ca_cert), "--interval", "5", env=env)
    assert done.returncode == 0, done.stderr
    config = (out / firmware.CONFIG_NAME).read_text()
    assert "CONNECTION_STRING = 'HostName=b.example;Port=8883;DeviceId=dev-1;" in config
    assert "CA_FILE = 'ca.crt'" in config and "INTERVAL_S = 5.0" in config
    assert (out / firmware.CONFIG_NAME).stat().st_mode & 0o077 == 0  # it holds the key
    assert (out / firmware.CA_NAME).read_bytes() == tls_files.ca_cert.read_bytes()
    # Self-provisioning instead: the enrollment, its group key, the broker; no device id.
    enrolled = tmp_path / "enrolled"
    provisioning = ["firmware", "config", "--enrollment", "fleet", "--wifi-ssid", "home",
                    "--out", str(enrolled), "--ca-file", str(tls_files.ca_cert),
                    "--registration-id", "esp32-1"]
    without_key = fleetline(*provisioning, "--mqtt-url", "mqtts://b.example:8883", env=env)
    assert without_key.returncode == 2 and "--group-key" in without_key.stderr
    done = fleetline(*provisioning, "--group-key", key, "--mqtt-url", "mqtts://b.example:8883",
                     env=env)
    assert done.returncode == 0, done.stderr
    config = (enrolled / firmware.CONFIG_NAME).read_text()
    assert "ENROLLMENT = 'fleet'" in config and "REGISTRATION_ID = 'esp32-1'" in config
    assert f"REGISTRATION_KEY = '{devicekeys.registration_key(key, 'esp32-1')}'" in config
    assert key not in config
    assert "PROVISIONING_HOST = 'b.example'" in config and "PROVISIONING_PORT = 8883" in config
    assert (enrolled / firmware.CONFIG_NAME).stat().st_mode & 0o077 == 0

    flash = fleetline("firmware", "flash", "--port", "/dev/ttyUSB0", "--build",
                      str(board_build), "--config", str(out), "--dry-run")
    assert flash.returncode == 0, flash.stderr
    words = flash.stdout.split()
    assert words[:3] == ["mpremote", "connect", "/dev/ttyUSB0"] and words[-1] == "reset"
    copied = {w.lstrip(":") for w in words if w.startswith(":")}
    assert copied == {*APPLICATION, *BOARD_APPLICATION["esp32"], "ca.crt", "config_local.py"}
    missing = fleetline("firmware", "flash", "--port", "/dev/ttyUSB0", "--build",
                        str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "firmware build" in missing.stderr


TLS_PROBE = """
import sys
from umqtt.simple import MQTTClient
import fleetline_umqtt
ca = open(sys.argv[1], "rb").read()
client = fleetline_umqtt.client_class(MQTTClient, 3, fleetline_umqtt.tls_context(ca))
try:
    client("probe", sys.argv[2], int(sys.argv[3])).connect()
    print("accepted")
except Exception as exc:
    print("refused", repr(exc))
"""


@pytest.mark.parametrize("case", ["valid", "expired", "other-ca", "other-host"])
def test_the_board_refuses_a_broker_it_cannot_verify(
    micropython: MicroPython, board_build: Path, tls_files: TlsFiles, tmp_path: Path,
    case: str,
) -> None:
    """The broker presents a certificate that is expired, signed by another CA, or made
    for another name: the board's TLS refuses it before sending its credentials. The
    same probe accepts a valid one (the control)."""
    ca_cert, ca_key = certs.make_ca(tmp_path / "ca")
    trusted = tmp_path / "ca" / "ca.crt"
    if case == "other-ca":
        trusted = tls_files.ca_cert
    start = None
    if case == "expired":
        start = datetime.now(UTC) - timedelta(days=3)
    hosts = ["broker.example.org"] if case == "other-host" else ["127.0.0.1"]
    cert, key = certs.issue(ca_cert, ca_key, hosts[0], hosts=hosts, days=1, not_before=start)
    (tmp_path / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.write_private(tmp_path / "server.key", certs.key_pem(key))
    files = TlsFiles(tmp_path / "ca" / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")
    (tmp_path / "probe.py").write_text(TLS_PROBE)
    with LocalMosquitto(tmp_path / "mq", tls=files) as broker:
        done = subprocess.run(
            [str(micropython.micropython), "-X", f"heapsize={HEAP_KIB}K", "probe.py",
             str(trusted), "127.0.0.1", str(broker.tls_port)],
            cwd=tmp_path, env=micropython_env(board_build), capture_output=True, text=True,
            timeout=60)
    if case == "valid":
        assert done.stdout.startswith("accepted"), done.stdout + done.stderr
    else:  # refused by the certificate check, not for another reason
        assert done.stdout.startswith("refused") and "certificate" in done.stdout.lower(), (
            done.stdout + done.stderr)


async def test_readings_taken_offline_survive_a_reset_and_are_sent_once(
    micropython: MicroPython, board_build: Path, backend: Backend, tls_files: TlsFiles,
    tmp_path: Path, uid: str,
) -> None:
    """The broker is unreachable from the start: readings go to the backlog and, one by
    one, to its file in flash. The board is reset (killed) and powered on with the broker
    back: it starts with those readings and sends them, each stored once, with what it
    takes afterwards."""
    c = _client(backend.api, backend.key)
    device_id = f"{uid}-esp32"
    key = _register(c, device_id)["key"]
    proxy = TcpProxy(("127.0.0.1", backend.broker.tls_port or 0))  # down until powered on again
    config = firmware.config_text(
        connection_string=f"HostName=127.0.0.1;Port={proxy.port};DeviceId={device_id};"
                          f"SharedAccessKey={key}",
        wifi_ssid="test", wifi_password="-", ca_file=firmware.CA_NAME, interval_s=0.2,
        extra={"SOCKET_TIMEOUT_S": 2})
    board = Board(micropython, board_build, tmp_path / "board", config, tls_files)
    backlog = tmp_path / "board" / "backlog.jsonl"
    try:
        wait_until(lambda: backlog.exists() and backlog.read_bytes().count(b"\n{") >= 15,
                   timeout=30, what=f"readings in flash\n{board.console()[-2000:]}")
        board.kill()  # a reset: RAM is gone, the file stays
        header, *lines = backlog.read_bytes().splitlines()
        assert header == f"#{device_id}".encode()  # only this device's readings
        kept = [json.loads(line) for line in lines
                if line.startswith(b"{") and line.endswith(b"}")]
        assert len(kept) >= 15
        proxy.up()
        board.power_on()
        assert "readings from before the reset" in await asyncio.to_thread(
            wait_until, lambda: "connected as" in board.console() and board.console(),
            timeout=30, what="the board connected after the reset")
        # Every reading kept in flash is stored, at its own time.
        wanted = {r["ts"] for r in kept}

        async def stored() -> set[int]:
            rows = await backend.db.fetch(
                "SELECT (extract(epoch FROM time) * 1000)::bigint AS ms FROM readings "
                "WHERE device_id = $1 AND metric = 'uptime_s'", device_id)
            return {r["ms"] for r in rows}

        deadline = time.monotonic() + 30
        while not wanted <= (got := await stored()):
            assert time.monotonic() < deadline, (len(wanted - got), board.console()[-2000:])
            await asyncio.sleep(0.2)
        wait_until(lambda: not backlog.exists(), what="the backlog file removed once sent")
        _reboot(c, device_id, board)
    finally:
        board.kill()
        proxy.down()
    REPORT.append(f"esp32 application: {len(kept)} readings kept in flash across a reset, "
                  "all stored once after it")


async def test_a_malformed_desired_twin_is_refused_with_a_reason_in_the_twin(
    micropython: MicroPython, board_build: Path, backend: Backend, tls_files: TlsFiles,
    tmp_path: Path, uid: str,
) -> None:
    """A desired value the board cannot apply, and one it does not know, are reported
    back with the reason (`desired_errors`); garbage published on its c2d topic is
    dropped with a log line; the board goes on (no crash, no reconnect)."""
    c = _client(backend.api, backend.key)
    device_id = f"{uid}-esp32"
    config = firmware.config_text(
        connection_string=_register(c, device_id)["connection_string"],
        wifi_ssid="test", wifi_password="-", ca_file=firmware.CA_NAME, interval_s=0.5)
    board = Board(micropython, board_build, tmp_path / "board", config, tls_files)
    try:
        wait_until(lambda: c.get(f"/v1/devices/{device_id}").json()["online"], timeout=30,
                   what=f"the board online\n{board.console()[-2000:]}")
        patched = c.patch(f"/v1/devices/{device_id}/twin",
                          json={"interval_s": "fast", "colour": "red"})
        assert patched.status_code == 200, patched.text
        twin = wait_until(
            lambda: (t := c.get(f"/v1/devices/{device_id}/twin").json())["reported"]
            .get("desired_errors") and t, timeout=30, what="the refusal reported")
        errors = twin["reported"]["desired_errors"]
        assert "interval_s must be a number" in errors["interval_s"], errors
        assert errors["colour"] == "unknown here"
        # Garbage where the API would put a cloud-to-device message.
        garbage = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{uid}-svc")
        garbage.username_pw_set(API_USER, SERVICES[API_USER])
        garbage.connect("127.0.0.1", backend.broker.port)
        garbage.loop_start()
        for payload in (b"\xff\xfe not json", b"[1, 2]", b'{"body": "no id"}'):
            garbage.publish(f"devices/{device_id}/c2d", payload, qos=1).wait_for_publish(10)
        garbage.loop_stop()
        garbage.disconnect()
        # One of the two fixed: only the other stays in error.
        patched = c.patch(f"/v1/devices/{device_id}/twin", json={"colour": None})
        assert patched.status_code == 200, patched.text
        wait_until(lambda: set(c.get(f"/v1/devices/{device_id}/twin").json()["reported"]
                               .get("desired_errors") or {}) == {"interval_s"}, timeout=30,
                   what="only interval_s left in desired_errors")
        # Fixed: applied whole, the errors cleared.
        patched = c.patch(f"/v1/devices/{device_id}/twin", json={"interval_s": 1})
        assert patched.status_code == 200, patched.text
        wait_until(lambda: (r := c.get(f"/v1/devices/{device_id}/twin").json()["reported"])
                   .get("interval_s") == 1 and "desired_errors" not in r, timeout=30,
                   what="the corrected twin applied")
        _reboot(c, device_id, board)
    finally:
        board.kill()
    console = board.console()
    assert console.count("connected as") == 1, console  # no reconnect for any of it
    assert "is not a JSON object" in console and "without an id" in console
    assert "Traceback" not in console


ESP8266_METRICS = {"adc": 1024.0, "temperature": 21.5, "humidity": 40.0}


@pytest.mark.parametrize(
    ("board", "heap_kib", "tls", "metrics"),
    [
        ("esp8266", 80, True, ESP8266_METRICS),
        ("esp8266", 72, False, ESP8266_METRICS),
        ("pyboard", 100, True, {"adc": 3000.0, "mcu_temp": 36.6}),
    ],
    ids=["esp8266-tls", "esp8266-plain", "pyboard-tls"],
)
async def test_the_other_board_layers_run_the_same_application(
    micropython: MicroPython, backend: Backend, tls_files: TlsFiles, tmp_path: Path,
    uid: str, board: str, heap_kib: int, tls: bool, metrics: dict[str, float],
) -> None:
    """`fleetline firmware build --board esp8266|pyboard`: the same core and main.py with
    the board's own layer (Wi-Fi or the Pyboard's Ethernet, its ADC, a DHT22, the STM32's
    temperature), over TLS, in the board's heap."""
    out = build(micropython, tmp_path / "build", board)
    c = _client(backend.api, backend.key)
    device_id = f"{uid}-{board}"
    connection_string = _register(c, device_id)["connection_string"]
    if not tls:  # the broker's plain listener
        connection_string = connection_string.replace(
            f"Port={backend.broker.tls_port};", f"Port={backend.broker.port};")
    config = firmware.config_text(
        connection_string=connection_string, wifi_ssid="test", wifi_password="-",
        ca_file=firmware.CA_NAME if tls else None, interval_s=0.5,
        extra={"ADC_PIN": 0 if board == "esp8266" else "X19", "WATCHDOG_S": 20,
               **({"DHT_PIN": 4} if board == "esp8266" else {})})
    fakes = tmp_path / "board" / "fakes"
    fakes.mkdir(parents=True)
    (fakes / "adc").write_text("3000")
    (fakes / "dht").write_text("21.5 40.0")
    running = Board(micropython, out, tmp_path / "board", config, tls_files, heap_kib=heap_kib)
    try:
        latest = wait_until(
            lambda: (m := c.get(f"/v1/devices/{device_id}/latest").json().get("metrics", {}))
            and set(metrics) <= set(m) and m, timeout=30,
            what=f"the {board}'s readings\n{running.console()[-2000:]}")
        assert {name: latest[name]["value"] for name in metrics} == metrics
        twin = wait_until(lambda: (t := c.get(f"/v1/devices/{device_id}/twin").json())
                          ["reported"].get("platform") and t, what="the reported platform")
        assert twin["reported"]["platform"] == board
        _reboot(c, device_id, running)
    finally:
        running.kill()
    console = running.console()
    assert "Traceback" not in console and "MemoryError" not in console, console[-3000:]
    free = [r["value"] for r in await _readings(backend.db, device_id, "mem_free")]
    REPORT.append(f"{board} application {'over TLS' if tls else 'without TLS'} in a "
                  f"{heap_kib} KiB heap: the least free heap a reading reported "
                  f"{min(free):,.0f} bytes")
