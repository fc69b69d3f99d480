"""Files uploaded by devices (docs/uploads.md), end to end on the secure broker (TLS, the
auth plugin) and the API's devices' HTTPS listener: a device asks over MQTT for an
upload, PUTs it in parts, is cut off, asks again and resumes where it stood; the file
lands (an event on the live stream), is listed, read whole and by range, and deleted
over REST; and what is refused: another device's URL, an expired one, a part past the
declared size, a file over the limit or the device's quota, bytes that do not hash as
declared, a finished name again. An unfinished upload past its expiry is swept."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect

from fleetline_api import grants
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem, client
from tests.integration.test_cli import fleetline
from tests.integration.test_stream import Service, next_events, subscribed, ws_url
from tests.integration.test_transfers import Requester, requesters  # noqa: F401 - a fixture
from tests.support import DEVICE_KEY_SECRET, ApiProcess, RulesProcess, wait_until

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def ask(dev: Requester, name: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return dev.ask({"id": name, "op": "upload", "name": name, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "content_type": "text/plain",
                    **extra})


def put(https: httpx.Client, dev: Requester, url: str, data: bytes, start: int, end: int,
        total: int | None = None) -> httpx.Response:
    return https.put(url, content=data[start:end + 1], headers={
        **dev.authorization(), "Content-Range": f"bytes {start}-{end}/{total or len(data)}"})


async def test_a_device_uploads_a_file_in_parts_resumes_it_and_it_is_served(
    secure_api: ApiProcess, secure_key: Callable[..., Any], secure_db: asyncpg.Pool[Any],
    requesters: Callable[[str, str], Requester], tls_files: TlsFiles, uid: str,  # noqa: F811
    start_rules: Callable[..., RulesProcess], broker: LocalMosquitto, secure_database_url: str,
) -> None:
    c = client(secure_api, await secure_key("admin"))
    keys = {}
    for name in ("a", "b"):
        made = c.post("/v1/devices", json={"id": f"{uid}-{name}"})
        assert made.status_code == 201, made.text
        keys[name] = made.json()["credentials"]["key"]
    # A route of the files device a uploads, to an MQTT topic (the rules service's, on
    # the session's broker).
    start_rules(database=secure_database_url)
    watcher = Service(broker, f"watch-{uid}", f"routed/{uid}")
    route = c.post("/v1/routes", json={
        "name": f"{uid} files", "source": "files", "query": f"id = '{uid}-a'",
        "destination": {"type": "mqtt", "topic": f"routed/{uid}"}})
    assert route.status_code == 201, route.text
    assert_problem(c.post("/v1/routes", json={
        "name": f"{uid} bad", "source": "files", "metric": "temp",
        "destination": {"type": "mqtt", "topic": f"routed/{uid}"}}), 400, "whole")
    a = requesters(f"{uid}-a", keys["a"])
    b = requesters(f"{uid}-b", keys["b"])
    data = os.urandom(300 * 1024)
    verify = ssl.create_default_context(cafile=tls_files.ca_cert)
    headers = {"Authorization": f"Bearer {await secure_key('telemetry:read')}"}
    async with connect(ws_url(secure_api, device=a.device_id, events="file"),
                       additional_headers=headers) as ws:
        await subscribed(ws)
        with httpx.Client(verify=verify, timeout=30) as https:
            answer = ask(a, "crash.log", data)
            assert (answer["status"], answer["received"]) == (200, 0), answer
            url, file_id = answer["url"], answer["file_id"]
            first = put(https, a, url, data, 0, 100 * 1024 - 1)
            assert first.status_code == 200, first.text
            assert (first.json()["state"], first.json()["received"]) == ("uploading", 100 * 1024)
            # Cut off: it does not know how far it got, and asks again for the same file.
            assert_problem(put(https, a, url, data, 0, 1023), 409, "starts at byte 102400")
            again = ask(a, "crash.log", data)
            assert (again["file_id"], again["received"]) == (file_id, 100 * 1024)
            url = again["url"]
            # Another device, an expired URL, a part past the declared size.
            assert_problem(https.put(url, content=b"x", headers={
                **b.authorization(), "Content-Range": f"bytes 102400-102400/{len(data)}"}),
                403, "another device")
            key = grants.grant_key(DEVICE_KEY_SECRET.encode())
            old = grants.sign(key, grants.Grant("upload", a.device_id, file_id,
                                                int(time.time()) - 1))
            assert_problem(put(https, a, f"{secure_api.device_url}/v1/transfers/{old}", data,
                               102400, 102499), 403, "expired")
            assert_problem(put(https, a, url, data + b"more", 102400, len(data) + 3,
                               total=len(data) + 4), 413, "goes past it")
            rest = put(https, a, url, data, 100 * 1024, len(data) - 1)
            assert rest.status_code == 200, rest.text
            landed = rest.json()
            assert (landed["state"], landed["size"], landed["name"]) == (
                "complete", len(data), "crash.log")
            assert landed["sha256"] == hashlib.sha256(data).hexdigest()
            assert_problem(put(https, a, url, data, 0, 9), 409, "complete")
            [event] = await next_events(ws, 1)
        assert event["type"] == "file" and event["device_id"] == a.device_id
        assert event["file"]["id"] == file_id and event["file"]["state"] == "complete"
        # ...and through the route of files.
        [routed] = wait_until(
            lambda: [json.loads(p) for t, p, _ in watcher.messages if t == f"routed/{uid}"],
            timeout=30, what="the file through its route")
        assert (routed["type"], routed["device_id"], routed["route"]) == (
            "file", a.device_id, f"{uid} files")
        assert routed["file"] == {"id": file_id, "name": "crash.log", "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest(),
                                  "content_type": "text/plain"}
        watcher.close()

        # Over REST: listed, read whole and by range, with its content type.
        files = c.get(f"/v1/devices/{a.device_id}/files").json()["items"]
        assert [(f["id"], f["state"]) for f in files] == [(file_id, "complete")]
        whole = c.get(f"/v1/devices/{a.device_id}/files/{file_id}/content")
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["content-type"].startswith("text/plain")
        part = c.get(f"/v1/devices/{a.device_id}/files/{file_id}/content",
                     headers={"Range": "bytes=-10"})
        assert part.status_code == 206 and part.content == data[-10:]
        assert_problem(c.get(f"/v1/devices/{b.device_id}/files/{file_id}"), 404, "no file")
        assert ask(a, "crash.log", data)["status"] == 409  # a finished name

        # Limits: larger than a file may be, over the device's quota; bytes that do not
        # hash as declared start over.
        assert ask(a, "huge.bin", b"", size=17 * MIB, sha256="0" * 64)["status"] == 413
        for n in range(3):
            assert ask(a, f"part{n}.bin", b"", size=16 * MIB, sha256="1" * 64)["status"] == 200
        over = ask(a, "part3.bin", b"", size=16 * MIB, sha256="1" * 64)
        assert over["status"] == 413 and "quota" in over["error"], over
        assert ask(a, "bad name", data)["status"] == 400
        lie = ask(a, "lie.txt", data, sha256="2" * 64)
        with httpx.Client(verify=verify, timeout=30) as https:
            assert_problem(put(https, a, lie["url"], data, 0, len(data) - 1), 422,
                           "starts over")

        # An unfinished upload past its expiry is swept, its bytes with it.
        blob_ids = [r["blob_id"] for r in await secure_db.fetch(
            "SELECT blob_id FROM device_files WHERE device_id = $1", a.device_id)]
        assert len(blob_ids) == 5
        await secure_db.execute("UPDATE device_files SET expires_at = now() - interval '1 s' "
                         "WHERE device_id = $1 AND state = 'uploading'", a.device_id)
        for _ in range(100):
            left = await secure_db.fetchval(
                "SELECT count(*) FROM device_files WHERE device_id = $1 "
                "AND state = 'uploading'", a.device_id)
            if left == 0:
                break
            await asyncio.sleep(0.1)
        assert left == 0

        # The command line lists, downloads and deletes.
        env = {"FLEETLINE_API_URL": secure_api.url, "FLEETLINE_API_KEY": await secure_key("admin")}
        listed = fleetline("file", "list", a.device_id, "--json", env=env)
        assert [f["name"] for f in json.loads(listed.stdout)] == ["crash.log"], listed.stderr
        out = f"/tmp/{uid}-crash.log"
        got = fleetline("file", "download", a.device_id, str(file_id), "--out", out, env=env)
        assert got.returncode == 0, got.stderr
        with open(out, "rb") as f:
            assert f.read() == data
        os.remove(out)
        assert fleetline("file", "delete", a.device_id, str(file_id), env=env).returncode == 0
        assert c.get(f"/v1/devices/{a.device_id}/files").json()["items"] == []
        assert await secure_db.fetchval(
            "SELECT count(*) FROM blobs WHERE id = ANY($1)", blob_ids) == 0
