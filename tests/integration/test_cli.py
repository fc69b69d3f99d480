"""The command line against the running API and database, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from typer.testing import CliRunner

from fleetline import certificates, devicekeys
from fleetline_cli.main import app
from fleetline_dev.certs import cert_pem, issue, make_ca, self_signed
from fleetline_dev.embedded import LocalMosquitto
from tests.support import DEVICE_KEY_SECRET, ApiProcess, Device, IngestProcess

pytestmark = pytest.mark.integration


def fleetline(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``fleetline ARGS`` in this process (a process start costs half a second), with
    ``env`` over this process's environment and no .fleetline/env read; as a process's
    result."""
    # In a thread of its own: a verb may run an event loop (monitor), the test one.
    with ThreadPoolExecutor(1) as thread:
        result = thread.submit(CliRunner().invoke, app, list(args),
                               env={"FLEETLINE_ENV_FILE": "", **env}).result()
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["fleetline", *args], result.exit_code, result.stdout,
                                       stderr)


async def test_device_verbs_and_telemetry_query(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")}
    made = fleetline("device", "create", f"{uid}-c", "--tag", f"site={uid}", "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["tags"] == {"site": uid}
    again = fleetline("device", "create", f"{uid}-c", env=env)
    assert again.returncode == 1 and "409 Conflict" in again.stderr
    listed = fleetline("device", "list", "--tag", f"site={uid}", "--json", env=env)
    assert [d["id"] for d in json.loads(listed.stdout)] == [f"{uid}-c"]
    table = fleetline("device", "list", "--tag", f"site={uid}", env=env).stdout.splitlines()
    assert table[0].split() == ["device", "status", "last", "seen", "key", "gateway", "tags"]
    assert table[1].split()[:3] == [f"{uid}-c", "offline", "-"] and f"site={uid}" in table[1]
    shown = fleetline("device", "show", f"{uid}-c", env=env)
    assert shown.returncode == 0 and shown.stdout.startswith(f"{uid}-c")
    matched = fleetline("device", "query", f"tags.site = '{uid}'", env=env).stdout.splitlines()
    assert matched[0].split() == ["device", "status", "desired", "reported", "tags"]
    assert matched[1].split()[:4] == [f"{uid}-c", "offline", "v0", "v0"]
    bad_query = fleetline("device", "query", f"tags.site = '{uid}' AND", env=env)
    assert bad_query.returncode == 1 and "at position" in bad_query.stderr
    query = fleetline("telemetry", "query", f"{uid}-c", "--bucket", "1h", "--json", env=env)
    assert query.returncode == 0 and json.loads(query.stdout) == []
    bad = fleetline("telemetry", "query", f"{uid}-c", "--from", "yesterday", env=env)
    assert bad.returncode == 1 and "422" in bad.stderr
    assert fleetline("device", "delete", f"{uid}-c", env=env).returncode == 0
    gone = fleetline("device", "show", f"{uid}-c", env=env)
    assert gone.returncode == 1 and "404 Not Found" in gone.stderr


def test_missing_key_and_unreachable_api_are_clear_errors() -> None:
    no_key = fleetline("device", "list", env={"FLEETLINE_API_KEY": ""})
    assert no_key.returncode == 1 and "set FLEETLINE_API_KEY" in no_key.stderr
    down = fleetline("device", "list",
                     env={"FLEETLINE_API_KEY": "flk_x", "FLEETLINE_API_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "cannot reach the API" in down.stderr


async def test_device_credentials_verbs(
    api: ApiProcess, make_key: Callable[..., Any], uid: str, tmp_path: Path
) -> None:
    env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")}
    made = fleetline("device", "create", f"{uid}-k", env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.split("shown once): ", 1)[1].split()[0]
    version = json.loads(fleetline("device", "show", f"{uid}-k", "--json", env=env).stdout)[
        "key_version"]
    assert devicekeys.derive_key(DEVICE_KEY_SECRET.encode(), f"{uid}-k", version) == key
    assert f"DeviceId={uid}-k;SharedAccessKey={key}" in made.stdout
    token = fleetline("device", "token", f"{uid}-k", "--ttl", "60", env=env)
    assert token.returncode == 0
    assert devicekeys.verify_password(key, f"{uid}-k", token.stdout.strip())
    conn = fleetline("device", "connection-string", f"{uid}-k", "--key", key, "--port", "8883",
                     env=env)
    assert conn.stdout.strip() == (
        f"HostName=127.0.0.1;Port=8883;DeviceId={uid}-k;SharedAccessKey={key}")
    # By default the broker the API names for devices (its connection strings' too).
    endpoint = httpx.get(f"{api.url}/v1/endpoints", timeout=10,
                         headers={"Authorization": f"Bearer {env['FLEETLINE_API_KEY']}"}).json()
    default = fleetline("device", "connection-string", f"{uid}-k", "--key", key, env=env)
    assert default.stdout.strip() == (
        f"HostName={endpoint['device_mqtt_host']};Port={endpoint['device_mqtt_port']};"
        f"DeviceId={uid}-k;SharedAccessKey={key}")
    assert f"Port={endpoint['device_mqtt_port']};" in made.stdout
    as_json = fleetline("device", "connection-string", f"{uid}-k", "--key", key, "--mqtt-url",
                        "mqtts://broker.example:8884", "-o", "json", env=env)
    assert json.loads(as_json.stdout) == {
        "device_id": f"{uid}-k", "host": "broker.example", "port": 8884,
        "connection_string": f"HostName=broker.example;Port=8884;DeviceId={uid}-k;"
                             f"SharedAccessKey={key}"}
    # A board's config, and what was written as JSON.
    config = fleetline("firmware", "config", f"{uid}-k", "--wifi-ssid", "lab", "--wifi-password",
                       "pw", "--key", key, "--mqtt-url", "mqtt://broker.example:1883", "--plain",
                       "--out", str(tmp_path / "config"), "-o", "json", env=env)
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout) == {"wrote": [str(tmp_path / "config" / "config_local.py")]}
    assert f"SharedAccessKey={key}" in (tmp_path / "config" / "config_local.py").read_text()
    no_key = fleetline("device", "connection-string", f"{uid}-k", env=env)
    assert no_key.returncode == 2 and "--renew" in no_key.stderr
    renewed = fleetline("device", "connection-string", f"{uid}-k", "--renew", "-o", "yaml",
                        env=env)
    new_key = yaml.safe_load(renewed.stdout)["connection_string"].rsplit("SharedAccessKey=", 1)[1]
    version = json.loads(fleetline("device", "show", f"{uid}-k", "--json", env=env).stdout)[
        "key_version"]
    assert new_key == devicekeys.derive_key(DEVICE_KEY_SECRET.encode(), f"{uid}-k", version)


async def test_monitor_prints_live_events(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-m"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    env = {**os.environ, "FLEETLINE_API_URL": api.url,
           "FLEETLINE_API_KEY": await make_key("telemetry:read")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetline_cli", "monitor", "--device", device_id, "--count", "2",
         "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dev = Device(broker.url, device_id)
        # Publish until monitor has subscribed and printed two events.
        start = int(time.time() * 1000)
        for i in range(40):
            dev.publish_all([{"ts": start + i, "values": {"temp": i}}])
            if proc.poll() is not None:
                break
            time.sleep(0.25)
        out, err = proc.communicate(timeout=20)
        dev.close()
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2 and {e["device_id"] for e in events} == {device_id}
    assert all(e["type"] == "telemetry" and "temp" in e["values"] for e in events)
    denied = fleetline("monitor", env={"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": "flk_x"})
    assert denied.returncode == 1 and "4401" in denied.stderr


async def test_enrollment_ca_and_x509_device_verbs(
    api: ApiProcess, make_key: Callable[..., Any], uid: str, tmp_path: Path
) -> None:
    env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")}
    made = fleetline("enrollment", "create", uid, "--pattern", f"{uid}-[0-9]+", "--tag",
                     "fleet=a", "--desired", '{"interval_s": 5}', env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.split("enrollment key (shown once): ")[1].split()[0]
    assert len(devicekeys.registration_key(key, f"{uid}-1")) == 44
    listed = fleetline("enrollment", "list", "--json", env=env)
    assert uid in [e["id"] for e in json.loads(listed.stdout)]
    assert "disabled" in fleetline("enrollment", "disable", uid, env=env).stdout
    empty = fleetline("enrollment", "registrations", uid, "--json", env=env)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    bad = fleetline("enrollment", "create", f"{uid}-x", "--desired", "{", env=env)
    assert bad.returncode == 2 and "--desired" in bad.stderr

    ca, ca_key = make_ca(tmp_path / "ca", name=f"{uid} CA")
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca))
    added = fleetline("ca", "add", uid, str(tmp_path / "ca.pem"), "--json", env=env)
    assert added.returncode == 0, added.stderr
    proof, _ = issue(ca, ca_key, json.loads(added.stdout)["verification_code"], client=True)
    (tmp_path / "proof.pem").write_bytes(cert_pem(proof))
    verified = fleetline("ca", "verify", uid, str(tmp_path / "proof.pem"), env=env)
    assert verified.returncode == 0 and "verified" in verified.stdout, verified.stderr

    cert, _ = self_signed(f"{uid}-cam")
    (tmp_path / "cam.pem").write_bytes(cert_pem(cert))
    device = fleetline("device", "create", f"{uid}-cam", "--cert", str(tmp_path / "cam.pem"),
                       "--json", env=env)
    assert device.returncode == 0, device.stderr
    assert json.loads(device.stdout)["auth"]["primary_thumbprint"] == (
        certificates.thumbprint(cert).hex())
    signed = fleetline("device", "create", f"{uid}-ca", "--ca", uid, env=env)
    assert "logs in with its certificate (x509_ca)" in signed.stdout
    assert fleetline("device", "delete", f"{uid}-ca", env=env).returncode == 0
    assert fleetline("ca", "delete", uid, env=env).returncode == 0
