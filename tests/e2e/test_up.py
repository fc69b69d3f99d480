"""`fleetline up` as a user runs it (the README's `make run`): the embedded database, the
broker with its TLS listener for devices and a CA of its own, the three services and a
simulated fleet that publishes over TLS. A device registered over REST is told the TLS
endpoint and publishes there, verifying the broker with the CA file the banner names; a
second run keeps the CA, so devices keep trusting the broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import httpx
import pytest

from fleetline import apikeys, releases
from fleetline_dev.embedded import free_port
from fleetline_dev.simulator import MODEL
from tests.integration.test_firmware import declare, put_part
from tests.support import Device, wait_until

pytestmark = pytest.mark.integration

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
             "--data-dir", str(data_dir)],
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


async def test_up_serves_devices_over_tls_with_its_own_ca(tmp_path: Path, uid: str) -> None:
    ports = {"api": free_port(), "ingest": free_port(), "rules": free_port()}
    up = Up(tmp_path / "data", ports)
    try:
        api_url = up.field(r"API\s+(http://\S+) ")
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
            key = (await apikeys.create_key(con, name="t", scopes=["admin"])).token
            assert await con.fetchval("SELECT timescale FROM storage_config") is True
        finally:
            await con.close()
        c = httpx.Client(base_url=api_url, timeout=10, headers={"Authorization": f"Bearer {key}"})
        # Its own release key, made on first run, signs firmware releases.
        release_key = tmp_path / "data" / "release-key.pem"
        assert release_key.stat().st_mode & 0o077 == 0
        assert c.get("/v1/release-key").json()["public_key"] == releases.public_point(
            releases.load_key(release_key)).hex()
        # The simulated fleet publishes over TLS.
        wait_until(lambda: c.get("/v1/devices/sim-0000/latest").json().get("metrics"),
                   timeout=60, what="the simulated devices' readings")
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
        # Without TLS the devices' port answers nothing an MQTT client can use.
        with pytest.raises(AssertionError, match="could not connect"):
            Device(f"mqtt://127.0.0.1:{tls_port}", f"{uid}-plain", password=created["key"])
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
    finally:
        assert up.stop() == 0, up.output()
    ca = ca_file.read_bytes()
    signer = release_key.read_bytes()
    again = Up(tmp_path / "data", ports)
    try:
        assert Path(again.field(r"CA file\s+(\S+)\)")).read_bytes() == ca
        assert release_key.read_bytes() == signer
    finally:
        assert again.stop() == 0, again.output()


def release(c: httpx.Client, image: bytes, version: str, target: str) -> int:
    made = declare(c, image, version, target, kind="bundle")
    assert made.status_code == 201, made.text
    assert put_part(c, made.json()["id"], image, 0, len(image) - 1).status_code == 200
    return int(made.json()["id"])
