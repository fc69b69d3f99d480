"""Firmware updates on real MicroPython against the real services (docs/ota.md).

The ESP32 application (`fleetline firmware build --version 1.0.0`) runs on the unix port
with an ESP32's heap, over TLS to the broker with the auth plugin and to the API's
devices' HTTPS listener. Releases are bundles made by `fleetline firmware bundle` and
uploaded by `fleetline firmware upload`; rollouts are created over REST.

- v1 updates itself to v2 through a rollout: it checks the signed manifest, downloads
  over HTTPS with a URL signed for it (cut by a power loss, then resumed with Range),
  verifies, unpacks, reboots into v2 (the loader swaps the files in), and confirms;
  every state is seen on its reported twin, in order.
- A broken v3 (a module that fails to load) resets at every boot; after the loader's
  trial boots it rolls back to v2 by itself, which reports it.
- A tampered release (a manifest not signed by the release key) is refused before any
  byte is downloaded.
The rollouts' counts match.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest

from fleetline import releases
from fleetline_cli import firmware
from fleetline_dev.certs import TlsFiles
from tests.firmware.conftest import API_USER, SERVICES, MicroPython, mpy
from tests.firmware.test_board import Board, _client, _register, build, fleetline
from tests.stack import Backend, device_listener, serve_stack
from tests.support import release_key_file, wait_until

pytestmark = pytest.mark.integration

TIMEOUTS = {"notified": 120, "downloading": 120, "verifying": 60, "applying": 60,
            "rebooting": 120}


@pytest.fixture(scope="module")
async def ota_backend(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    env = device_listener(tls_files)
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "ota", env) as served:
        yield served


class TwinWatcher:
    """The service's view of one device's reported `firmware` states, in order."""

    def __init__(self, backend: Backend, device_id: str) -> None:
        self.states: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"watch-{device_id}")
        self.client.username_pw_set(API_USER, SERVICES[API_USER])
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            fw = json.loads(msg.payload).get("firmware")
            if isinstance(fw, dict) and fw.get("state"):
                with self._lock:
                    self.states.append((fw["rollout"], fw["state"]))

        self.client.on_message = on_message
        self.client.connect("127.0.0.1", backend.broker.port)
        self.client.loop_start()
        self.client.subscribe(f"devices/{device_id}/twin/reported", qos=1)
        assert subscribed.wait(10)

    def of(self, rollout: int) -> list[str]:
        """The states reported for ``rollout``, repeats folded."""
        with self._lock:
            seen = [s for r, s in self.states if r == rollout]
        return [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Power:
    """Keeps the board powered: a run that ends (machine.reset) is started again, as a
    board restarts; counts the boots."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.boots = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(0.05):
            if self.board.proc.poll() is not None:
                self.boots += 1
                self.board.power_on()

    def off(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.board.kill()


def release(env: dict[str, str], bundle: Path, version: str) -> int:
    done = fleetline("firmware", "upload", str(bundle), "--version", version, "--target",
                     "esp32", "--kind", "bundle", env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split(" as firmware ")[1].split()[0])


def broken_build(mp: MicroPython, out: Path, tmp: Path) -> Path:
    """v3: its board layer fails to load, so the application never comes up."""
    done = fleetline("firmware", "build", "--out", str(out), "--version", "3.0.0",
                     "--mpy-cross", str(mp.mpy_cross))
    assert done.returncode == 0, done.stderr
    source = tmp / "board.py"
    source.write_text('raise RuntimeError("v3: the sensor driver does not start")\n')
    mpy(mp, source, out / "board.mpy")
    return out


def wait_job(c: httpx.Client, job_id: int, console: Callable[[], str]) -> dict[str, Any]:
    job: dict[str, Any] = wait_until(
        lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["finished_at"] and j,
        timeout=240, interval=0.1, what=f"rollout {job_id}\n{console()[-3000:]}")
    return job


async def test_the_application_updates_itself_and_rolls_a_broken_version_back(
    micropython: MicroPython, ota_backend: Backend, tls_files: TlsFiles, tmp_path: Path,
    uid: str,
) -> None:
    backend = ota_backend
    c = _client(backend.api, backend.key)
    device_id = f"{uid}-esp32"
    builds = tmp_path / "builds"
    v1 = builds / "v1"
    build(micropython, v1, "esp32")
    for version, folder in (("1.0.0", v1), ("2.0.0", builds / "v2")):
        done = fleetline("firmware", "build", "--out", str(folder), "--version", version,
                         "--mpy-cross", str(micropython.mpy_cross))
        assert done.returncode == 0, done.stderr
    broken_build(micropython, builds / "v3", tmp_path)
    bundles = {}
    # v2 ships an asset too: a download long enough to be cut by a power loss.
    (builds / "v2" / "assets.bin").write_bytes(os.urandom(400 * 1024))
    for version in ("v2", "v3"):
        bundles[version] = tmp_path / f"{version}.bundle"
        done = fleetline("firmware", "bundle", str(builds / version), "--out",
                         str(bundles[version]))
        assert done.returncode == 0, done.stderr
        assert "files" in done.stdout
    env = {**os.environ, "FLEETLINE_API_URL": backend.api.url, "FLEETLINE_API_KEY": backend.key}
    v2_id, v3_id = release(env, bundles["v2"], "2.0.0"), release(env, bundles["v3"], "3.0.0")

    # The board: v1 on its filesystem, with the release key's public half in its config.
    public = releases.public_point(releases.load_key(release_key_file())).hex()
    config = firmware.config_text(
        connection_string=_register(c, device_id)["connection_string"], wifi_ssid="test",
        wifi_password="-", ca_file=firmware.CA_NAME, interval_s=2,
        extra={"RELEASE_KEY": public, "CRASH_RESET_S": 1, "SOCKET_TIMEOUT_S": 5})
    folder = tmp_path / "board"
    shutil.copytree(v1, folder)
    staging = folder / "ota.bin"
    watcher = TwinWatcher(backend, device_id)
    board = Board(micropython, folder, folder, config, tls_files)
    power = Power(board)
    try:
        wait_until(lambda: c.get(f"/v1/devices/{device_id}/twin").json()["reported"]
                   .get("fw") == "1.0.0", timeout=60, what=f"v1 up\n{board.console()[-2000:]}")

        # v1 -> v2, the power cut once the download is under way: it resumes.
        job = c.post("/v1/jobs", json={"type": "rollout", "query": f"id = '{device_id}'",
                                       "firmware_id": v2_id, "timeouts": TIMEOUTS})
        assert job.status_code == 201, job.text
        wait_until(lambda: staging.exists() and staging.stat().st_size > 100 * 1024,
                   timeout=60, interval=0.02, what=f"the download\n{board.console()[-2000:]}")
        board.proc.kill()  # power cut (the power supply turns it on again)
        done = wait_job(c, job.json()["id"], board.console)
        assert "resuming the download at " in board.console()
        assert done["state"] == "completed", done
        assert (done["progress"]["succeeded"], done["progress"]["total"]) == (1, 1)
        states = watcher.of(done["id"])
        assert states == ["downloading", "verifying", "applying", "rebooting", "succeeded"], states
        # The application's own `fw` is a patch of its own, after the rollout's report.
        twin = wait_until(
            lambda: (r := c.get(f"/v1/devices/{device_id}/twin").json()["reported"])["fw"]
            == "2.0.0" and r, timeout=30, what=f"fw 2.0.0 reported\n{board.console()[-2000:]}")
        assert twin["firmware"]["running"] == "2.0.0" and twin["firmware"]["state"] == "succeeded"
        assert (folder / "prev" / "main.py").exists()  # v1's files kept
        assert (folder / "assets.bin").read_bytes() == (builds / "v2" / "assets.bin").read_bytes()

        # v2 -> v3, which never comes up: rolled back to v2 by the board itself.
        boots = power.boots
        job = c.post("/v1/jobs", json={"type": "rollout", "query": f"id = '{device_id}'",
                                       "firmware_id": v3_id, "timeouts": TIMEOUTS})
        assert job.status_code == 201, job.text
        done = wait_job(c, job.json()["id"], board.console)
        assert (done["progress"]["rolled_back"], done["progress"]["total"]) == (1, 1), done
        row = c.get(f"/v1/jobs/{done['id']}/devices").json()["items"][0]
        assert row["state"] == "rolled_back" and "3.0.0 reset 3 times" in row["error"], row
        states = watcher.of(done["id"])
        assert states[:4] == ["downloading", "verifying", "applying", "rebooting"], states
        assert states[-1] == "rolled_back", states
        assert power.boots - boots >= 4  # into v3, two more tries, then back on v2
        assert "v3: the sensor driver does not start" in board.console()
        twin = c.get(f"/v1/devices/{device_id}/twin").json()["reported"]
        assert twin["fw"] == "2.0.0" and twin["firmware"]["running"] == "2.0.0"

        # A release whose manifest the release key did not sign: refused at once.
        tampered = c.get(f"/v1/firmware/{v3_id}").json()
        forged = json.loads(tampered["manifest"])
        forged["version"] = "9.0.0"
        await backend.db.execute(
            "UPDATE firmware SET manifest = $2 WHERE id = $1", v3_id,
            json.dumps(forged, sort_keys=True, separators=(",", ":")))
        job = c.post("/v1/jobs", json={"type": "rollout", "query": f"id = '{device_id}'",
                                       "firmware_id": v3_id, "timeouts": TIMEOUTS})
        done = wait_job(c, job.json()["id"], board.console)
        row = c.get(f"/v1/jobs/{done['id']}/devices").json()["items"][0]
        assert (row["state"], row["error"]) == (
            "failed", "the manifest's signature is not the release key's"), row
        assert watcher.of(done["id"]) == ["failed"]

        # The device uploads a file of its files/ folder, asked by the method `upload`.
        (folder / "files").mkdir()
        diag = os.urandom(20 * 1024)
        (folder / "files" / "diag.bin").write_bytes(diag)
        answer = c.post(f"/v1/devices/{device_id}/methods/upload",
                        json={"params": {"name": "diag.bin"}, "timeout_s": 15})
        assert answer.json()["status"] == 202, answer.text
        files = wait_until(
            lambda: [f for f in c.get(f"/v1/devices/{device_id}/files").json()["items"]
                     if f["state"] == "complete"], timeout=60,
            what=f"the upload\n{board.console()[-2000:]}")
        assert [f["name"] for f in files] == ["diag.bin"]
        got = c.get(f"/v1/devices/{device_id}/files/{files[0]['id']}/content")
        assert got.content == diag
        refused = c.post(f"/v1/devices/{device_id}/methods/upload",
                         json={"params": {"name": "../config_local.py"}, "timeout_s": 15})
        assert refused.json()["status"] == 400, refused.text
    finally:
        power.off()
        watcher.close()
    console = board.console()
    assert "MemoryError" not in console, console[-3000:]
