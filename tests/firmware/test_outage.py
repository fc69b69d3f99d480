"""The device core on real MicroPython after an outage: a full backlog (100 readings,
``BACKLOG_READINGS``) flushed in an ESP32-sized heap.

The unix port of MicroPython 1.28.0 (scripts/build-micropython.sh) runs
``drive_outage.py`` beside this file: the core, compiled to ``.mpy`` as a board runs it
(firmware/README.md), with micropython-lib's umqtt.simple (also ``.mpy``, as ``mip
install`` puts it on a board) and real sockets, logs in to the broker with the auth
plugin through a :class:`TcpProxy`; the test cuts the proxy while the device takes
readings, waits for its backlog to fill, and restores it. A real ingest stores what
arrives. Checked from outside: every reading stored exactly once at the device's own
``ts``, one login per outage (no reconnect storm), no MemoryError.

The unix port is 64-bit: a pointer, and so a small object's header and every list slot,
takes 8 bytes where the ESP32 takes 4, and the GC's blocks are 32 bytes, not 16. Large
buffers (a batch's payload) cost the same on both. So a heap of N KB here holds less
than N KB on a board: a flush that fits here fits there.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.firmware.conftest import REPORT, MicroPython, add_device, compiled, service_url
from tests.firmware.test_unix_port import micropython_env, stored_ms
from tests.support import IngestProcess, TcpProxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("drive_outage.py")
HEAP_KIB = 110  # what an ESP32 app has free
LIVE, BACKLOG, AFTER = 3, 100, 3  # readings before, during and after the outage
INTERVAL_S = 0.05
RUN_TIMEOUT_SECONDS = 120  # the driver gives up by itself after 90 s
STEP_TIMEOUT_SECONDS = 30


class Outage:
    """The driver as a child process, its stdout read line by line."""

    def __init__(self, mp: MicroPython, heap_kib: int, folder: Path, args: list[str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(mp.micropython), "-X", f"heapsize={heap_kib}K", str(DRIVER), *args],
            env=micropython_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def state(self) -> tuple[int, int, int] | None:
        for line in reversed(self.lines):
            if line.startswith("state "):
                connected, backlog, sent = map(int, line.split()[1:])
                return connected, backlog, sent
        return None

    def wait_state(self, check: Callable[[int, int, int], bool], what: str) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while True:
            state = self.state()
            if state is not None and check(*state):
                return
            assert self.proc.poll() is None, f"the driver exited waiting for {what}:\n{self}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self}"
            time.sleep(0.02)

    def finish(self) -> int:
        code = self.proc.wait(RUN_TIMEOUT_SECONDS)
        self._reader.join(10)
        return code

    def __str__(self) -> str:
        stderr = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr \
            else ""
        return "stdout:\n" + "\n".join(self.lines[-60:]) + "\nstderr:\n" + stderr


def run_outage(mp: MicroPython, heap_kib: int, folder: Path, broker_port: int,
               device_id: str, key: str, fail_every: int = 0,
               measure: bool = True) -> tuple[int, Outage]:
    """Readings before, during and after a cut link; returns the exit code and the run."""
    proxy = TcpProxy(("127.0.0.1", broker_port))
    proxy.up()
    try:
        run = Outage(mp, heap_kib, folder, [
            device_id, key, "127.0.0.1", str(proxy.port), str(LIVE), str(BACKLOG),
            str(AFTER), str(INTERVAL_S), str(fail_every), "1" if measure else "0"])
        try:
            run.wait_state(lambda c, b, s: c == 1 and s >= LIVE, "the live readings sent")
            proxy.down()
            run.wait_state(lambda c, b, s: c == 0 and b >= BACKLOG, "a full backlog offline")
            proxy.up()
            return run.finish(), run
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait(10)
    finally:
        proxy.down()


async def stored_once_at_their_ts(db: asyncpg.Pool[Any], ingest: IngestProcess,
                                  device_id: str, sent: list[dict[str, Any]]) -> None:
    async def count() -> int:
        return int(await db.fetchval(
            "SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'n'", device_id))

    deadline = asyncio.get_running_loop().time() + 30
    while await count() < len(sent):
        assert asyncio.get_running_loop().time() < deadline, (
            f"{await count()} of {len(sent)} readings stored; ingest log:\n{ingest.log_tail()}")
        await asyncio.sleep(0.1)
    # Stopped, ingest has written all it will: nothing may come twice after this.
    assert ingest.terminate() == 0, ingest.log_tail()
    rows = await db.fetch(
        "SELECT value, time FROM readings WHERE device_id = $1 AND metric = 'n' ORDER BY value",
        device_id)
    assert [(int(r["value"]), stored_ms(r["time"])) for r in rows] == [
        (r["values"]["n"], r["ts"]) for r in sent]


def parse(run: Outage) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = json.loads(next(line for line in run.lines if line.startswith("result "))
                        .removeprefix("result "))
    sent = [json.loads(line.removeprefix("reading ")) for line in run.lines
            if line.startswith("reading ")]
    return result, sent


@pytest.mark.parametrize("heap_kib", [110, 64])
async def test_a_full_backlog_flushes_after_an_outage_in_an_esp32_heap(
    micropython: MicroPython, auth_broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path, heap_kib: int,
) -> None:
    folder = compiled(micropython, tmp_path)
    ingest = start_ingest(mqtt_url=service_url(auth_broker))
    device_id = f"{uid}-out{heap_kib}"
    key = await add_device(db, device_id)
    try:
        code, run = await asyncio.to_thread(
            run_outage, micropython, heap_kib, folder, auth_broker.port, device_id, key)
        result, sent = parse(run)
        total = LIVE + BACKLOG + AFTER
        summary = (f"{heap_kib}K: connects {result['connects']}, MemoryErrors "
                   f"{result['memory_errors']}, sent {result['readings_sent']} of "
                   f"{result['readings_taken']}, live heap peak {result['heap_peak']} of "
                   f"{result['heap_total']}")
        print(summary)  # noqa: T201
        assert code == 0, f"{summary}\n{run}"
        # One login before the outage, one after it: no reconnect storm.
        assert result["connects"] == 2, f"{summary}\n{run}"
        assert result["memory_errors"] == 0 and result["memory_errors_counted"] == 0, summary
        assert result["readings_dropped"] == 0, summary
        assert [r["values"]["n"] for r in sent] == list(range(1, total + 1))
        await stored_once_at_their_ts(db, ingest, device_id, sent)
    finally:
        await db.execute("UPDATE device_activity SET online = false WHERE device_id = $1",
                         device_id)
    peak, heap = result["heap_peak"], result["heap_total"]
    REPORT.append(
        f"a {BACKLOG}-reading backlog flushed after an outage in a {heap_kib}K heap "
        f"(.mpy): live heap peak {peak} of {heap} bytes ({peak * 100 // heap} %), "
        f"{result['connects']} logins")


async def test_a_memory_error_while_building_a_batch_keeps_readings_and_connection(
    micropython: MicroPython, auth_broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path,
) -> None:
    """The heap locked (every allocation fails) while the core builds the first batch,
    and every second one after: the batch is tried again smaller, on the same
    connection, and nothing is lost or dropped."""
    folder = compiled(micropython, tmp_path)
    ingest = start_ingest(mqtt_url=service_url(auth_broker))
    device_id = f"{uid}-oom"
    key = await add_device(db, device_id)
    try:
        code, run = await asyncio.to_thread(
            run_outage, micropython, HEAP_KIB, folder, auth_broker.port, device_id, key, 2)
        result, sent = parse(run)
        assert code == 0, run
        assert result["injected"] >= 2, result  # it did fail, more than once
        # Each one counted by the core, none taken for a broken connection.
        assert result["memory_errors_counted"] == result["injected"], result
        assert not [line for line in run.lines if "connection lost: MemoryError" in line]
        assert result["connects"] == 2 and result["readings_dropped"] == 0, result
        assert [r["values"]["n"] for r in sent] == list(range(1, LIVE + BACKLOG + AFTER + 1))
        await stored_once_at_their_ts(db, ingest, device_id, sent)
    finally:
        await db.execute("UPDATE device_activity SET online = false WHERE device_id = $1",
                         device_id)
    REPORT.append(
        f"{result['injected']} MemoryErrors injected while batches were built ({HEAP_KIB}K): "
        f"all {result['readings_sent']} readings stored once, {result['connects']} logins")
