"""The device core on real MicroPython: the unix port of MicroPython 1.28.0, built from
source (scripts/build-micropython.sh), with an ESP32 app's heap (``-X heapsize=110K``).

``firmware/common/fleetline_device.py`` runs as it would on a board, imported from its
source, with micropython-lib's umqtt.simple as its MQTT client and real sockets: it logs
in as a registered device with a SAS token signed by its own key (checked by the
project's auth plugin in Mosquitto), sends readings that carry their own ``ts``, says
offline and disconnects; a real ingest process stores them. The driver run by
MicroPython is ``drive_readings.py`` beside this file.

What the heap holds is measured twice: the live data's high-water mark during the run
(sampled after a collection, see drive_readings.py), and the smallest heap that can
import the core (found by halving), since compiling a ``.py`` on the device needs far
more than running it. The unix port is 64-bit: its objects take about twice the ESP32's
4-byte words, so these figures overstate what a board uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.firmware.conftest import REPORT, MicroPython, add_device, compiled, service_url
from tests.support import IngestProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CORE_DIR = ROOT / "firmware" / "common"
DRIVER = Path(__file__).with_name("drive_readings.py")
HEAP_KIB = 110  # what an ESP32 app has free
READINGS = 12
INTERVAL_S = 0.2
RUN_TIMEOUT_SECONDS = 90  # the driver gives up by itself after 60 s


def micropython_env(*folders: Path) -> dict[str, str]:
    # ".frozen": the modules built into the binary; no ~/.micropython/lib.
    return {**os.environ, "MICROPYPATH": ":".join([".frozen", *map(str, folders)])}


def run_micropython(mp: MicroPython, heap_kib: int, args: list[str], *folders: Path,
                    timeout: float = RUN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(mp.micropython), "-X", f"heapsize={heap_kib}K", *args],
        env=micropython_env(*folders), capture_output=True, text=True, timeout=timeout,
    )


def smallest_heap_kib(mp: MicroPython, module: str, folder: Path, high: int = HEAP_KIB) -> int:
    """The smallest ``-X heapsize`` (KiB) up to ``high`` with which ``import module``
    succeeds."""
    low = 4  # fails at low (checked below), succeeds at high
    for heap, should in ((low, False), (high, True)):
        done = run_micropython(mp, heap, ["-c", f"import {module}"], folder, timeout=30)
        assert (done.returncode == 0) is should, f"import at {heap}K: {done.stderr}"
    while high - low > 1:
        mid = (low + high) // 2
        if run_micropython(mp, mid, ["-c", f"import {module}"], folder, timeout=30).returncode:
            low = mid
        else:
            high = mid
    return high


def stored_ms(when: datetime) -> int:
    return round((when - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000)


async def test_core_sends_readings_with_their_ts_each_stored_once(
    micropython: MicroPython, auth_broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path,
) -> None:
    ingest = start_ingest(mqtt_url=service_url(auth_broker))
    device_id = f"{uid}-mpy"
    key = await add_device(db, device_id)
    folder = compiled(micropython, tmp_path)  # as a board has it (firmware build)
    try:
        done = await asyncio.to_thread(
            run_micropython, micropython, HEAP_KIB,
            [str(DRIVER), device_id, key, "127.0.0.1", str(auth_broker.port), str(READINGS),
             str(INTERVAL_S)],
            folder,
        )
        output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert done.returncode == 0, output
        lines = done.stdout.splitlines()
        sent = [json.loads(line.removeprefix("reading ")) for line in lines
                if line.startswith("reading ")]
        result = json.loads(next(line for line in lines if line.startswith("result "))
                            .removeprefix("result "))
        # One login (a token the plugin accepted), every reading acknowledged by the broker.
        assert result["connects"] == 1 and result["last_error"] is None, output
        assert result["readings_sent"] == READINGS and result["readings_dropped"] == 0, output
        assert [r["values"]["n"] for r in sent] == list(range(1, READINGS + 1)), output
        ts = [r["ts"] for r in sent]
        assert all(isinstance(t, int) for t in ts) and ts == sorted(set(ts)), ts

        async def count() -> int:
            return int(await db.fetchval(
                "SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'n'",
                device_id))

        deadline = asyncio.get_running_loop().time() + 30
        while await count() < READINGS:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{await count()} of {READINGS} readings stored; ingest log:\n"
                f"{ingest.log_tail()}")
            await asyncio.sleep(0.1)
        # Stopped, ingest has written all it will: nothing may come twice after this.
        assert ingest.terminate() == 0, ingest.log_tail()
        rows = await db.fetch(
            "SELECT value, time FROM readings WHERE device_id = $1 AND metric = 'n' "
            "ORDER BY value", device_id)
        assert [(int(r["value"]), stored_ms(r["time"])) for r in rows] == [
            (r["values"]["n"], r["ts"]) for r in sent]  # each once, at the device's own ts
    finally:
        await db.execute("UPDATE device_activity SET online = false WHERE device_id = $1",
                         device_id)

    peak, total = result["heap_peak"], result["heap_total"]
    REPORT.append(
        f"{READINGS} readings over the auth broker from fleetline_device.py: live heap peak "
        f"{peak} of {total} bytes ({peak * 100 // total} %; after imports "
        f"{result['heap_after_imports']})")
    assert total <= HEAP_KIB * 1024 and peak < total


def test_heap_needed_to_import_the_core(micropython: MicroPython, tmp_path: Path) -> None:
    """A board imports the core as a .mpy compiled beforehand (`fleetline firmware
    build`): that fits an ESP32 app's heap with room to spare. Compiling the .py on the
    board itself would take several times the heap (firmware/README.md says so)."""
    needed = {
        "py": smallest_heap_kib(micropython, "fleetline_device", CORE_DIR, high=512),
        "mpy": smallest_heap_kib(micropython, "fleetline_device", compiled(micropython, tmp_path)),
    }
    for form, kib in needed.items():
        REPORT.append(f"importing fleetline_device.{form} needs a {kib}K heap "
                      f"(of {HEAP_KIB}K; 64-bit unix port)")
    assert needed["mpy"] < HEAP_KIB // 3 and needed["py"] > 2 * needed["mpy"], needed
