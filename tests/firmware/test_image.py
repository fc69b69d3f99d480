"""Firmware images on the ESP32's OTA partitions (firmware/common/fleetline_ota.py and
fleetline_boot.py), under the real MicroPython unix port with stand-in partitions
(tests/firmware/partitions/esp32.py: two partitions as files, and the bootloader's choice
at each boot, rolling back an image reset before it was marked valid). Each boot is a
run of tests/firmware/drive_image.py: the image written block by block, cut by a reset
and resumed from what the partition holds (hashed again), verified, set to boot; the new
image confirmed once it comes up (marked valid); a later image that resets before it
comes up rolled back by the bootloader, which the loader reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.firmware.conftest import MicroPython
from tests.firmware.test_unix_port import run_micropython

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def boot(mp: MicroPython, folder: Path, *args: str) -> str:
    done = run_micropython(mp, 512, [str(HERE / "drive_image.py"), args[0], str(folder),
                                     *args[1:]], HERE / "partitions", ROOT / "firmware" / "common")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def state(out: str) -> dict[str, object]:
    line = [x for x in out.splitlines() if x.startswith("state ")][-1]
    found: dict[str, object] = json.loads(line[len("state "):])
    return found


def otadata(folder: Path) -> dict[str, object]:
    found: dict[str, object] = json.loads((folder / "otadata.json").read_text())
    return found


def test_an_image_is_written_resumed_confirmed_and_a_bad_one_rolled_back(
    micropython: MicroPython, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEETLINE_FAKES", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the board's filesystem: ota.json lands here
    v2, v3 = os.urandom(150_000), os.urandom(30_000)
    (tmp_path / "v2.bin").write_bytes(v2)
    (tmp_path / "v3.bin").write_bytes(v3)

    # Written into ota_1 (ota_0 runs); a reset at 70 KB keeps the whole 64 KiB blocks
    # recorded, and the next boot goes on from there, hashing them again.
    first = boot(micropython, tmp_path, "first-half")
    assert state(first)["written"] == 65536 and state(first)["partition"] == "ota_1"
    second = boot(micropython, tmp_path, "second-half")
    assert "feeding from 65536" in second and "reboot asked True" in second
    assert state(second)["phase"] == "staged"
    assert (tmp_path / "ota_1.bin").read_bytes()[: len(v2)] == v2
    assert otadata(tmp_path)["boot"] == "ota_1"

    # The bootloader boots it; it comes up and confirms itself (marked valid).
    up = boot(micropython, tmp_path, "run", "2.0.0", "confirm")
    assert state(up)["phase"] == "succeeded"
    assert otadata(tmp_path)["events"] == ["boot ota_1", "valid ota_1"]

    # v3 into ota_0, booted, and it resets before it comes up: the bootloader goes back
    # to ota_1 and the loader says so.
    staged = boot(micropython, tmp_path, "stage", "2.0.0", "3.0.0", "v3.bin")
    assert state(staged)["phase"] == "staged" and state(staged)["partition"] == "ota_0"
    crashed = boot(micropython, tmp_path, "run", "3.0.0", "crash")
    assert state(crashed)["phase"] == "trial"
    back = boot(micropython, tmp_path, "run", "2.0.0", "no")
    assert state(back)["phase"] == "rolled_back"
    assert state(back)["reason"] == (
        "version 3.0.0 the bootloader went back to the previous firmware")
    assert otadata(tmp_path)["running"] == "ota_1"
    assert otadata(tmp_path)["events"][-2:] == ["boot ota_0", "rollback ota_0"]
    reports = [json.loads(x) for x in (tmp_path / "reports").read_text().splitlines()]
    assert [r["state"] for r in reports][:4] == ["verifying", "applying", "rebooting",
                                                 "succeeded"]
    assert reports[-1]["state"] == "rebooting"  # v3's; the next connection reports rolled_back
