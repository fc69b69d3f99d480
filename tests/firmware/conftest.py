"""Fixtures for the firmware on real MicroPython: the unix port built from source
(scripts/build-micropython.sh, cached after the first build) and a broker that checks
device keys with the project's auth plugin.

A failed build fails the run: nothing here is skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline import devicekeys
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto
from tests.stack import API_USER, KEY_SECRET, SERVICES, service_url
from tests.support import SUMMARY_PROPERTY

__all__ = ["API_USER", "KEY_SECRET", "SERVICES", "service_url"]

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-micropython.sh"
CORE = ROOT / "firmware" / "common" / "fleetline_device.py"
# A first build takes about 30 s on 2 cores; a cached one returns at once.
BUILD_TIMEOUT_SECONDS = 900


# Lines for the end of the run (pytest_terminal_summary): what the firmware used.
REPORT: list[str] = []


@dataclass(frozen=True)
class MicroPython:
    """The built unix port: the interpreter, the compiler, and the folder that holds
    micropython-lib's ``umqtt/simple.py`` (a MICROPYPATH entry)."""

    micropython: Path
    mpy_cross: Path
    umqtt_simple: Path


@pytest.fixture(scope="session")
def micropython() -> MicroPython:
    try:
        result = subprocess.run(
            [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{BUILD_SCRIPT} did not run: {exc}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"{BUILD_SCRIPT} failed with {result.returncode}:\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    lines = result.stdout.strip().splitlines()
    if len(lines) < 2:
        pytest.fail(f"{BUILD_SCRIPT} printed {result.stdout!r}, not two folders",
                    pytrace=False)
    bin_dir, umqtt_dir = Path(lines[-2]), Path(lines[-1])
    built = MicroPython(bin_dir / "micropython", bin_dir / "mpy-cross", umqtt_dir)
    for path in (built.micropython, built.mpy_cross, built.umqtt_simple / "umqtt/simple.py"):
        if not path.is_file():
            pytest.fail(f"{BUILD_SCRIPT} succeeded but {path} is missing", pytrace=False)
    return built


@pytest.fixture(scope="module")
def auth_broker(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMosquitto]:
    """Mosquitto with fleetline's auth plugin: devices log in with keys derived from
    KEY_SECRET (key_for), ingest with its service account (service_url)."""
    auth = BrokerAuth(database_url=database_url, key_secret=KEY_SECRET, services=SERVICES)
    with LocalMosquitto(tmp_path_factory.mktemp("mosquitto-firmware"), auth=auth) as server:
        yield server


def key_for(device_id: str, version: int = 1) -> str:
    return devicekeys.derive_key(KEY_SECRET, device_id, version)


async def add_device(db: asyncpg.Pool[Any], device_id: str, version: int = 1) -> str:
    """Register ``device_id`` with key version ``version``; returns its key."""
    await db.execute("INSERT INTO devices (id, key_version) VALUES ($1, $2)", device_id, version)
    return key_for(device_id, version)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport() -> Any:
    """REPORT's lines go with the report of the test that wrote them, to the end of the
    run (tests/conftest.py prints them, from pytest-xdist's workers too)."""
    outcome = yield
    if REPORT:
        report = outcome.get_result()
        report.user_properties.extend(
            (SUMMARY_PROPERTY, ("firmware on the MicroPython unix port", line))
            for line in REPORT)
        REPORT.clear()


def mpy(mp: MicroPython, source: Path, target: Path) -> Path:
    """``source`` compiled by the build's mpy-cross into ``target`` (its folder made)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(mp.mpy_cross), "-o", str(target), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return target


def umqtt_compiled(mp: MicroPython, folder: Path) -> None:
    """umqtt.simple in ``folder`` as ``mip install`` puts it on a board."""
    mpy(mp, mp.umqtt_simple / "umqtt" / "simple.py", folder / "umqtt" / "simple.mpy")


def compiled(mp: MicroPython, folder: Path) -> Path:
    """The core and umqtt.simple as ``.mpy`` files in ``folder``."""
    mpy(mp, CORE, folder / "fleetline_device.mpy")
    umqtt_compiled(mp, folder)
    return folder
