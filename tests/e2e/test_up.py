"""`fleetline up` as a user runs it (the README's `make run`): the embedded database, the
broker with its TLS listener for devices and a CA of its own, the three services and a
simulated fleet that publishes over TLS. A device registered over REST is told the TLS
endpoint and publishes there, verifying the broker with the CA file the banner names; a
second run keeps the CA, so devices keep trusting the broker. The first API key is made
with the command the banner prints, and the command line finds the deployment by itself
(``<data dir>/env``, gone once ``up`` stops). A port asked for and taken stops ``up`` in
one line before anything starts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from fleetline import releases
from fleetline_dev.embedded import free_port
from fleetline_dev.simulator import MODEL
from tests.e2e.readme import run_examples
from tests.integration.test_firmware import declare, put_part
from tests.support import Device, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

START_TIMEOUT_SECONDS = 120


class Up:
    """One `fleetline up` process and what it printed."""

    def __init__(self, data_dir: Path, ports: dict[str, int]) -> None:
        env = {
            **os.environ,
            "FLEETLINE_API_PORT": str(ports["api"]),
            "FLEETLINE_INGEST_HTTP_PORT": str(ports["ingest"]),
            "FLEETLINE_RULES_HTTP_PORT": str(ports["rules"]),
            "FLEETLINE_LOG_FORMAT": "json",
        }
        for name in ("FLEETLINE_DATABASE_URL", "FLEETLINE_MQTT_URL"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetline_cli", "up", "--devices", "3", "--interval", "0.5",
             "--gateways", "1", "--children-per-gateway", "2", "--data-dir", str(data_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(lambda: "Ctrl-C to stop." in self.lines, timeout=START_TIMEOUT_SECONDS,
                   what=f"`fleetline up` to start:\n{self.output()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(line for line in self.lines if not line.startswith("{"))

    def field(self, pattern: str) -> str:
        match = re.search(pattern, self.output())
        assert match, f"{pattern!r} not in the banner:\n{self.output()}"
        return match.group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


async def test_up_serves_devices_over_tls_and_the_readme_examples_work(
    tmp_path: Path, uid: str
) -> None:
    ports = {"api": free_port(), "ingest": free_port(), "rules": free_port()}
    up = Up(tmp_path / "data", ports)
    try:
        api_url = up.field(r"API\s+(http://\S+)\n")
        assert api_url == f"http://127.0.0.1:{ports['api']}"
        device_url = up.field(r"(mqtts://\S+) \(devices")
        ca_file = Path(up.field(r"CA file\s+(\S+)\)"))
        assert ca_file == tmp_path / "data" / "tls" / "ca.crt" and ca_file.is_file()
        tls_port = int(device_url.rsplit(":", 1)[1])
        database_url = up.field(r"database\s+(postgresql://\S+)")
        # The production storage: TimescaleDB, built into the embedded PostgreSQL (by
        # `make test` beforehand, else here on first run) and preloaded.
        assert up.field(r"storage\s+(TimescaleDB \S+)") == "TimescaleDB 2.28.3"
        con = await asyncpg.connect(database_url)
        try:
            assert await con.fetchval("SELECT timescale FROM storage_config") is True
        finally:
            await con.close()
        assert up.field(r"dashboard\s+(http://\S+)") == f"{api_url}/dashboard/"
        assert up.field(r"psql\s+\S+ (postgresql://\S+)") == database_url
        # Every other address the banner prints answers, and each service listens on the
        # loopback interface only (the devices' TLS and HTTPS listeners are for devices).
        metrics = re.findall(r"(http://127\.0\.0\.1:(\d+)/metrics) \((\w+)\)", up.output())
        assert sorted(name for _, _, name in metrics) == ["api", "ingest", "rules"], metrics
        for path in ("/docs", "/redoc", "/dashboard/"):
            assert httpx.get(f"{api_url}{path}", timeout=10).status_code == 200, path
        listening: dict[int, set[str]] = {}
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN:
                listening.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
        for url, port, _name in metrics:
            assert httpx.get(url, timeout=10).status_code == 200, url
            assert listening[int(port)] == {"127.0.0.1"}, (url, listening[int(port)])
        for port in ports.values():
            assert listening[port] == {"127.0.0.1"}, (port, listening[port])
        # The first key, made with the banner's own command (from the project's folder: the
        # command line finds the deployment through the file the banner names).
        command = up.field(r"make an API key.*:\n\s+(.+)")
        env_file = tmp_path / "data" / "env"
        assert command.startswith(f"FLEETLINE_ENV_FILE={env_file} ")
        assert env_file.stat().st_mode & 0o077 == 0
        outside = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLINE_")}
        made = subprocess.run(["bash", "-c", command], cwd=ROOT, env=outside,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        key = made.stdout.split()[0]
        assert key.startswith("flk_"), made.stdout
        c = httpx.Client(base_url=api_url, timeout=10, headers={"Authorization": f"Bearer {key}"})
        # Its own release key, made on first run, signs firmware releases.
        release_key = tmp_path / "data" / "release-key.pem"
        assert release_key.stat().st_mode & 0o077 == 0
        assert c.get("/v1/release-key").json()["public_key"] == releases.public_point(
            releases.load_key(release_key)).hex()
        # The simulated fleet publishes over TLS.
        wait_until(lambda: c.get("/v1/devices/sim-0000/latest").json().get("metrics"),
                   timeout=60, what="the simulated devices' readings")
        # ...and so does the simulated gateway, for its children, created by the broker.
        wait_until(lambda: c.get("/v1/devices/sim-gw-00-c001/latest").json().get("metrics"),
                   timeout=60, what="the simulated gateway's children's readings")
        assert c.get("/v1/devices/sim-gw-00-c001").json()["parent"] == "sim-gw-00"
        # ...read through the command line, which needs only the key and the env file.
        read = subprocess.run(
            [str(ROOT / ".venv/bin/fleetline"), "telemetry", "query", "sim-0000", "--json"],
            env={**outside, "FLEETLINE_ENV_FILE": str(env_file), "FLEETLINE_API_KEY": key},
            capture_output=True, text=True, timeout=60)
        assert read.returncode == 0, read.stderr
        assert {p["metric"] for p in json.loads(read.stdout)} >= {"temperature"}, read.stdout
        # A registered device is pointed at the TLS listener and publishes there.
        created = c.post("/v1/devices", json={"id": f"{uid}-d"}).json()["credentials"]
        parts = dict(p.split("=", 1) for p in created["connection_string"].split(";"))
        assert int(parts["Port"]) == tls_port and f"{parts['HostName']}:" in device_url
        dev = Device(f"mqtts://127.0.0.1:{tls_port}", f"{uid}-d", password=created["key"],
                     ca_file=ca_file)
        dev.publish_all([{"values": {"t": 1.5}}])
        wait_until(lambda: c.get(f"/v1/devices/{uid}-d/latest").json().get("metrics"),
                   what="the device's reading")
        dev.close()
        # Without TLS the devices' port answers nothing an MQTT client can use (a broker
        # speaking MQTT there would answer the CONNECT within milliseconds, not seconds).
        with pytest.raises(AssertionError, match="could not connect"):
            Device(f"mqtt://127.0.0.1:{tls_port}", f"{uid}-plain", password=created["key"],
                   connect_timeout=2)
        # The simulated fleet takes a rollout, downloading from the devices' HTTPS listener.
        assert up.field(r"downloads\s+(https://\S+) \(devices").startswith("https://")
        image = b"sim-th1 application 2.0.0" * 100
        fw = release(c, image, "2.0.0", MODEL)
        job = c.post("/v1/jobs", json={"type": "rollout", "query": "tags.source = 'simulator'",
                                       "firmware_id": fw, "canary": 1}).json()
        done = wait_until(lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["finished_at"]
                          and j, timeout=60, what="the rollout over the simulated fleet")
        assert (done["state"], done["progress"]["succeeded"]) == ("completed", 3), done
        assert c.get("/v1/devices/sim-0001/twin").json()["reported"]["fw"] == "2.0.0"
        # The README's examples, as a reader runs them after `make run`.
        printed = run_examples(api_url=api_url, env_file=env_file, key=key)
        assert '"status":200' in printed.replace(" ", ""), printed  # sim-0001 answered ping
        assert c.get("/v1/devices/meter-7").json()["parent"] is None
    finally:
        assert up.stop() == 0, up.output()
    assert not env_file.exists()
    ca = ca_file.read_bytes()
    signer = release_key.read_bytes()
    again = Up(tmp_path / "data", ports)
    try:
        assert Path(again.field(r"CA file\s+(\S+)\)")).read_bytes() == ca
        assert release_key.read_bytes() == signer
    finally:
        assert again.stop() == 0, again.output()


def test_a_port_asked_for_and_taken_is_one_line_before_anything_starts(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "FLEETLINE_INGEST_HTTP_PORT": str(port)}
        for name in ("FLEETLINE_DATABASE_URL", "FLEETLINE_MQTT_URL"):
            env.pop(name, None)
        done = subprocess.run(
            [sys.executable, "-m", "fleetline_cli", "up", "--data-dir", str(tmp_path / "d")],
            env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: port {port} (FLEETLINE_INGEST_HTTP_PORT) is in use: stop what listens there, "
        "or set FLEETLINE_INGEST_HTTP_PORT to another port (unset, fleetline up picks a free "
        "one)"], done.stderr
    assert "is up" not in done.stdout
    assert not (tmp_path / "d" / "postgres").exists()


def release(c: httpx.Client, image: bytes, version: str, target: str) -> int:
    made = declare(c, image, version, target, kind="bundle")
    assert made.status_code == 201, made.text
    assert put_part(c, made.json()["id"], image, 0, len(image) - 1).status_code == 200
    return int(made.json()["id"])
