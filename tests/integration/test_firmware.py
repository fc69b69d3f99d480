"""The firmware registry over REST against the real database: a release declared, its
image uploaded in parts (one interrupted and resumed), released with a manifest that the
release key signed and the device's own check accepts, served whole and by range; and
what it refuses (a wrong hash, parts out of order, oversize images, duplicates, no
release key, missing scopes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from fleetline import releases
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem, client
from tests.integration.test_cli import fleetline
from tests.support import ApiProcess, release_key_file

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware" / "common"))
import fleetline_release  # noqa: E402

PART = 256 * 1024


def declare(c: httpx.Client, image: bytes, version: str, target: str = "esp32",
            **extra: Any) -> httpx.Response:
    return c.post("/v1/firmware", json={
        "version": version, "target": target, "kind": "image", "size": len(image),
        "sha256": hashlib.sha256(image).hexdigest(), **extra})


def put_part(c: httpx.Client, firmware_id: int, image: bytes, start: int, end: int
             ) -> httpx.Response:
    return c.put(f"/v1/firmware/{firmware_id}/content", content=image[start:end + 1],
                 headers={"Content-Range": f"bytes {start}-{end}/{len(image)}",
                          "Content-Type": "application/octet-stream"})


async def test_an_image_uploaded_in_parts_is_released_signed_and_served_by_range(
    api: ApiProcess, make_key: Callable[..., Any], uid: str,
) -> None:
    c = client(api, await make_key("firmware:write"))
    image = os.urandom(3 * PART + 12_345)
    made = declare(c, image, f"1.0.{uid[-4:]}", notes="first")
    assert made.status_code == 201, made.text
    release = made.json()
    assert (release["status"], release["received"], release["manifest"]) == ("uploading", 0, None)
    fid = release["id"]
    assert_problem(c.get(f"/v1/firmware/{fid}/content"), 409, "still uploading")

    # Two parts; the third is lost on the way (a part that starts past `received`
    # is refused, naming where to go on), then the upload resumes.
    for start in (0, PART):
        assert put_part(c, fid, image, start, start + PART - 1).status_code == 200
    assert_problem(put_part(c, fid, image, 3 * PART, len(image) - 1), 409,
                   f"the next part starts at byte {2 * PART}")
    assert c.get(f"/v1/firmware/{fid}").json()["received"] == 2 * PART
    assert_problem(put_part(c, fid, image, 0, 9), 409, f"starts at byte {2 * PART}")
    assert put_part(c, fid, image, 2 * PART, 3 * PART - 1).json()["status"] == "uploading"
    done = put_part(c, fid, image, 3 * PART, len(image) - 1)
    assert done.status_code == 200, done.text
    release = done.json()
    assert release["status"] == "released" and release["received"] == len(image)
    assert_problem(put_part(c, fid, image, 0, 9), 409, "complete")

    # The manifest is the image's, signed by the release key, and the device accepts it.
    public = c.get("/v1/release-key").json()["public_key"]
    assert bytes.fromhex(public) == releases.public_point(releases.load_key(release_key_file()))
    manifest = fleetline_release.check_manifest(
        release["manifest"].encode(), release["signature"], public, "esp32")
    assert manifest == {"version": release["version"], "target": "esp32", "kind": "image",
                        "size": len(image), "sha256": hashlib.sha256(image).hexdigest()}

    whole = c.get(f"/v1/firmware/{fid}/content")
    assert whole.status_code == 200 and whole.content == image
    assert whole.headers["accept-ranges"] == "bytes"
    check = fleetline_release.ImageCheck(manifest)
    check.update(whole.content)
    check.finish()
    for asked, want in (("bytes=100-199", image[100:200]), (f"bytes={PART}-", image[PART:]),
                        ("bytes=-10", image[-10:]), ("bytes=0-0", image[:1])):
        part = c.get(f"/v1/firmware/{fid}/content", headers={"Range": asked})
        assert part.status_code == 206 and part.content == want, asked
        assert part.headers["content-range"].endswith(f"/{len(image)}")
    for bad in (f"bytes={len(image)}-", "bytes=5-2", "bytes=-0", "bytes=x-1"):
        assert_problem(c.get(f"/v1/firmware/{fid}/content", headers={"Range": bad}), 416)
    for ignored in ("bytes=0-1,4-5", "items=0-1"):  # a server may ignore these: the whole
        whole = c.get(f"/v1/firmware/{fid}/content", headers={"Range": ignored})
        assert whole.status_code == 200 and whole.content == image

    listed = c.get("/v1/firmware", params={"target": "esp32"}).json()["items"]
    assert fid in [r["id"] for r in listed]
    assert c.delete(f"/v1/firmware/{fid}").status_code == 204
    assert_problem(c.get(f"/v1/firmware/{fid}"), 404)


async def test_bytes_that_do_not_hash_as_declared_are_dropped_and_the_upload_starts_over(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str,
) -> None:
    c = client(api, await make_key("firmware:write"))
    image = os.urandom(1000)
    fid = declare(c, image, f"2.0.{uid[-4:]}").json()["id"]
    assert put_part(c, fid, image, 0, 499).status_code == 200
    corrupt = image[:500] + bytes([image[500] ^ 1]) + image[501:]
    assert_problem(put_part(c, fid, corrupt, 500, 999), 422, "starts over")
    again = c.get(f"/v1/firmware/{fid}").json()
    assert (again["received"], again["status"]) == (0, "uploading")
    blob = await db.fetchval("SELECT blob_id FROM firmware WHERE id = $1", fid)
    assert await db.fetchval("SELECT count(*) FROM blob_parts WHERE blob_id = $1", blob) == 0
    assert put_part(c, fid, image, 0, 999).json()["status"] == "released"


async def test_what_the_registry_refuses(
    api: ApiProcess, make_key: Callable[..., Any], uid: str,
) -> None:
    writer = client(api, await make_key("firmware:write"))
    image = b"x" * 100
    version = f"3.0.{uid[-4:]}"
    assert declare(writer, image, version).status_code == 201
    assert_problem(declare(writer, image, version), 409, "already has a release")
    assert declare(writer, image, version, target="esp8266").status_code == 201
    assert_problem(declare(writer, b"x" * (16 * 1024 * 1024 + 1), "9.9.9"), 400,
                   "FLEETLINE_API_FIRMWARE_MAX_BYTES")
    good = {"version": "4.0.0", "target": "esp32", "kind": "image", "size": 100,
            "sha256": "ab" * 32}
    for bad in ({"version": "../x"}, {"kind": "zip"}, {"sha256": "AB" * 32}, {"size": 0},
                {"size": "100"}, {"size": True},
                {"extra": 1}):
        assert_problem(writer.post("/v1/firmware", json=good | bad), 422)
    fid = declare(writer, image, f"5.0.{uid[-4:]}").json()["id"]
    for headers, detail in (({}, "Content-Range"),
                            ({"Content-Range": "bytes 0-99/101"}, "not 101"),
                            ({"Content-Range": "bytes 0-49/100"}, "its Content-Range says 50"),
                            ({"Content-Range": "bytes 50-149/100"}, "not within")):
        resp = writer.put(f"/v1/firmware/{fid}/content", content=image, headers=headers)
        assert_problem(resp, 400, detail)
    assert_problem(put_part(writer, 2**62, image, 0, 99), 404)
    reader = client(api, await make_key("devices:read"))
    assert_problem(declare(reader, image, "6.0.0"), 403, "firmware:write")
    assert_problem(client(api, await make_key("devices:write")).post(
        "/v1/firmware", json=good), 403, "firmware:write")
    assert_problem(put_part(reader, fid, image, 0, 99), 403)
    assert reader.get(f"/v1/firmware/{fid}").status_code == 200


async def test_without_a_release_key_nothing_can_be_released(
    database_url: str, broker: LocalMosquitto, artifacts: Path, uid: str,
    make_key: Callable[..., Any],
) -> None:
    api = ApiProcess(database_url=database_url, mqtt_url=broker.url, log_dir=artifacts,
                     name=f"{uid}-nokey", env={"FLEETLINE_API_RELEASE_KEY_FILE": ""}).start()
    try:
        c = client(api, await make_key("firmware:write"))
        assert_problem(declare(c, b"x" * 10, "1.0.0"), 409, "FLEETLINE_API_RELEASE_KEY_FILE")
        assert_problem(c.get("/v1/release-key"), 409, "no release key")
    finally:
        api.stop()


def test_a_release_key_file_that_is_not_one_stops_the_api_in_one_line(
    database_url: str, broker: LocalMosquitto, artifacts: Path, tmp_path: Path, uid: str,
) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    api = ApiProcess(database_url=database_url, mqtt_url=broker.url, log_dir=artifacts,
                     name=f"{uid}-badkey", env={"FLEETLINE_API_RELEASE_KEY_FILE": str(bad)})
    api.start(wait_ready=False)
    assert api.proc is not None
    assert api.proc.wait(timeout=30) == 2
    log = api.log_path.read_text()
    assert "FLEETLINE_API_RELEASE_KEY_FILE" in log and "not an unencrypted PEM" in log, log
    assert "Traceback" not in log


async def test_the_cli_uploads_a_release_in_parts_with_progress(
    api: ApiProcess, make_key: Callable[..., Any], tmp_path: Path, uid: str,
) -> None:
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(1_300_000))
    env = {**os.environ, "FLEETLINE_API_URL": api.url,
           "FLEETLINE_API_KEY": await make_key("firmware:write")}
    # A run interrupted after its first part: the next run goes on with that upload.
    c = client(api, env["FLEETLINE_API_KEY"])
    data = image.read_bytes()
    started = declare(c, data, f"7.0.{uid[-4:]}").json()
    assert put_part(c, started["id"], data, 0, PART - 1).status_code == 200
    done = subprocess.run(
        [sys.executable, "-m", "fleetline_cli", "firmware", "upload", str(image),
         "--version", f"7.0.{uid[-4:]}", "--target", "esp32", "--kind", "image", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "262,144 of" not in done.stderr  # that part was not sent again
    assert "786,432 of 1,300,000 bytes (60%)" in done.stderr
    assert "1,300,000 of 1,300,000 bytes (100%)" in done.stderr
    release = json.loads(done.stdout)  # -o json: the release, alone on stdout
    fid = release["id"]
    assert fid == started["id"] and release["status"] == "released" and release["signature"]
    assert c.get(f"/v1/firmware/{fid}/content").content == image.read_bytes()
    # The releases, listed, shown and deleted (in this process: no start-up to wait for).
    key_env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": env["FLEETLINE_API_KEY"]}

    def cli(*args: str) -> str:
        result = fleetline("firmware", *args, env=key_env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    unfinished = declare(c, data, f"7.1.{uid[-4:]}").json()
    listed = {r["id"]: r for r in json.loads(cli("list", "--target", "esp32", "--limit", "1000",
                                                 "-o", "json"))}
    assert listed[fid] == release and listed[unfinished["id"]]["status"] == "uploading"
    table = cli("list", "--target", "esp32", "--limit", "1000").splitlines()
    assert table[0].split() == ["id", "target", "version", "kind", "status", "size", "released"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[str(fid)][1:7] == ["esp32", f"7.0.{uid[-4:]}", "image", "released",
                                   "1,300,000", release["released_at"]]
    assert rows[str(unfinished["id"])][4:6] == ["uploading", "(0"]
    assert yaml.safe_load(cli("show", str(fid), "-o", "yaml")) == release
    shown = cli("show", str(fid)).splitlines()
    assert shown[0] == f"firmware {fid}: esp32 7.0.{uid[-4:]} (image), released"
    assert f"sha256 {release['sha256']}" in shown[1]
    assert f"  signature {release['signature']}" in shown
    assert cli("delete", str(unfinished["id"])) == f"deleted firmware {unfinished['id']}\n"
    gone = fleetline("firmware", "show", str(unfinished["id"]), env=key_env)
    assert gone.returncode == 1
    assert gone.stderr == f"error: 404 Not Found: firmware {unfinished['id']} not found\n"
    # A release key and a manifest signed offline, as JSON and YAML.
    key_file = tmp_path / "release-key.pem"
    made = json.loads(cli("keygen", "--out", str(key_file), "-o", "json"))
    assert made["key_file"] == str(key_file)
    assert bytes.fromhex(made["release_key"]) == releases.public_point(
        releases.load_key(key_file))
    signed = yaml.safe_load(cli("sign", str(image), "--version", "7.2.0", "--target", "esp32",
                                "--kind", "image", "--key", str(key_file), "-o", "yaml"))
    assert signed["path"] == str(tmp_path / "app.bin.release.json")
    assert json.loads(signed["manifest"])["sha256"] == release["sha256"]
    assert releases.verify(bytes.fromhex(made["release_key"]), signed["manifest"].encode(),
                           bytes.fromhex(signed["signature"]))
    again = subprocess.run(
        [sys.executable, "-m", "fleetline_cli", "firmware", "upload", str(image),
         "--version", f"7.0.{uid[-4:]}", "--target", "esp32", "--kind", "image"],
        env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"error: 409 Conflict: esp32 already has a release 7.0.{uid[-4:]}"]
