"""`fleetline simulate` against a deployment it knows only by its API URL and key: the
secure broker (TLS, the auth plugin checking each device's key) and its API; the
devices and gateways it registers publish readings (a gateway its children's) that
ingest stores."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from typer.testing import CliRunner

from fleetline_cli.main import app
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.conftest import API_PASSWORD
from tests.support import ApiProcess, IngestProcess

pytestmark = pytest.mark.integration


async def until(check: Callable[[], Awaitable[Any]], *, what: str, timeout: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def readings_of(secure_db: asyncpg.Pool[Any], prefix: str) -> dict[str, int] | None:
    """Readings stored per device of the prefix (the gateway's children included), once
    each of 3 devices has 3 and a child of the gateway has one."""
    counts = dict(await secure_db.fetch(
        "SELECT device_id, count(*) FROM readings WHERE device_id LIKE $1 || '%' "
        "GROUP BY device_id", prefix))
    own = [n for d, n in counts.items() if not d.startswith(f"{prefix}gw-")]
    children = [d for d in counts if d.startswith(f"{prefix}gw-00-c")]
    return counts if len(own) == 3 and min(own) >= 3 and children else None


async def all_offline(secure_db: asyncpg.Pool[Any], prefix: str) -> bool:
    """The 3 devices, the gateway and its 2 children said offline."""
    return bool(await secure_db.fetchval(
        "SELECT count(*) = 6 FROM device_activity WHERE device_id LIKE $1 || '%' AND NOT online",
        prefix))


async def test_simulate_registers_its_fleet_and_its_readings_are_stored(
    secure_broker: LocalMosquitto, secure_api: ApiProcess, tls_files: TlsFiles,
    start_ingest: Callable[..., IngestProcess], secure_key: Callable[..., Any],
    secure_db: asyncpg.Pool[Any], secure_database_url: str, uid: str,
) -> None:
    # Ingest on the secure broker and its database, with the service account the
    # fixture made.
    start_ingest(mqtt_url=f"mqtt://api:{API_PASSWORD}@127.0.0.1:{secure_broker.port}",
                 database=secure_database_url)
    key = await secure_key("devices:write", "devices:read")
    prefix = f"{uid}-"
    # A simulated device of the prefix registered already (an earlier run's): the
    # simulator issues it a new key.
    with httpx.Client(base_url=secure_api.url, timeout=10,
                      headers={"Authorization": f"Bearer {key}"}) as rest:
        earlier = {"source": "simulator", "run": "earlier"}
        before = rest.post("/v1/devices", json={"id": f"{prefix}0000", "tags": earlier})
        assert before.status_code == 201, before.text
        env = {**os.environ, "FLEETLINE_API_URL": secure_api.url, "FLEETLINE_API_KEY": key,
               "FLEETLINE_DEVICE_CA_FILE": str(tls_files.ca_cert), "FLEETLINE_ENV_FILE": ""}
        env.pop("FLEETLINE_DEVICE_MQTT_URL", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetline_cli", "simulate", "--devices", "3", "--interval",
             "0.2", "--prefix", prefix, "--gateways", "1", "--children-per-gateway", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            per_device = await until(lambda: readings_of(secure_db, prefix),
                                     what="3 readings of each")
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            _out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert (f"simulating 3 devices ({prefix}0000...{prefix}0002) and 1 gateway "
                f"({prefix}gw-00) with 2 children each on "
                f"mqtts://127.0.0.1:{secure_broker.tls_port}") in err
        own = sorted(d for d in per_device if not d.startswith(f"{prefix}gw-"))
        assert own == [f"{prefix}000{i}" for i in range(3)], per_device
        # The gateway, registered over the API, created its children, whose readings it
        # published; its limits were scaled for them.
        gateway = rest.get(f"/v1/devices/{prefix}gw-00").json()
        assert gateway["gateway"]["create_children"] and gateway["tags"] == {
            "source": "simulated-gateway"}
        child = next(d for d in per_device if d.startswith(f"{prefix}gw-00-c"))
        assert child in (f"{prefix}gw-00-c000", f"{prefix}gw-00-c001")
        assert rest.get(f"/v1/devices/{child}").json()["parent"] == f"{prefix}gw-00"
        limits = rest.get(f"/v1/devices/{prefix}gw-00/limits").json()["limits"]
        assert limits["selector"] == f"device:{prefix}gw-00"
        # Each device said offline before it went (ingest keeps its status).
        await until(lambda: all_offline(secure_db, prefix), what="the devices to say offline")
        metrics = {r["metric"] for r in await secure_db.fetch(
            "SELECT DISTINCT metric FROM readings WHERE device_id = $1", f"{prefix}0001")}
        assert {"temperature", "humidity"} <= metrics
        renewed = rest.get(f"/v1/devices/{prefix}0000").json()
        assert renewed["key_version"] > before.json()["key_version"]
        assert renewed["tags"] == earlier
        assert rest.get(f"/v1/devices/{prefix}0001").json()["tags"] == {"source": "simulator"}
        # A device of the prefix that is not a simulated one keeps its key: the run stops
        # before any device starts.
        real = rest.post("/v1/devices", json={"id": f"{uid}-real-0000"}).json()
        refused = CliRunner().invoke(
            app, ["simulate", "--devices", "1", "--prefix", f"{uid}-real-"],
            env={"FLEETLINE_API_URL": secure_api.url, "FLEETLINE_API_KEY": key,
                 "FLEETLINE_ENV_FILE": ""})
        assert refused.exit_code == 1
        assert refused.stderr == (f"error: device {uid}-real-0000 exists and is not a simulated "
                                  "one (no tag source=simulator): choose another --prefix\n")
        assert rest.get(f"/v1/devices/{uid}-real-0000").json()["key_version"] == real[
            "key_version"]
    # An API that is not there is a one-line error, before any device starts.
    refused = CliRunner().invoke(app, ["simulate", "--devices", "1", "--prefix", f"{uid}-x-"],
                                 env={"FLEETLINE_API_URL": "http://127.0.0.1:9",
                                      "FLEETLINE_API_KEY": key, "FLEETLINE_ENV_FILE": ""})
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: cannot reach the API at http://127.0.0.1:9")
