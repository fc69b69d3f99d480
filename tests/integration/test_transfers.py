"""Transfers: a device being updated asks over MQTT (the secure broker, TLS, the auth
plugin) for a URL signed for it, and downloads the release over the API's devices'
HTTPS listener, whole and by range, proving itself with its SAS token; and what is
refused: another device's URL or credentials, an expired or forged URL, no rollout, a
malformed request, other routes on the devices' port."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from fleetline import devicekeys
from fleetline_api import grants
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem, client
from tests.integration.test_firmware import declare, put_part
from tests.support import DEVICE_KEY_SECRET, ApiProcess, Device

pytestmark = pytest.mark.integration


class Requester:
    """A device on the secure broker asking for transfers and reading the answers."""

    def __init__(self, broker: LocalMosquitto, tls: TlsFiles, device_id: str, key: str) -> None:
        self.device_id = device_id
        self.key = key
        token, _ = devicekeys.sas_token(key, device_id)
        self.device = Device(broker.tls_url, device_id, password=token, ca_file=tls.ca_cert)
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        c = self.device.client
        c.on_message = lambda _c, _u, msg: self.answers.put(orjson.loads(msg.payload))
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()
        c.subscribe(f"devices/{device_id}/transfers/res", qos=1)
        assert subscribed.wait(10), "the subscription was not acknowledged"

    def ask(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        raw = request if isinstance(request, bytes) else orjson.dumps(request)
        self.device.client.publish(f"devices/{self.device_id}/transfers/req", raw, qos=1)
        answer: dict[str, Any] = self.answers.get(timeout=15)
        return answer

    def authorization(self) -> dict[str, str]:
        token, _ = devicekeys.sas_token(self.key, self.device_id)
        return {"Authorization": f"SharedAccessSignature sr={self.device_id}&{token}"}


@pytest.fixture
def requesters(secure_broker: LocalMosquitto, tls_files: TlsFiles
               ) -> Iterator[Callable[[str, str], Requester]]:
    made: list[Requester] = []

    def make(device_id: str, key: str) -> Requester:
        made.append(Requester(secure_broker, tls_files, device_id, key))
        return made[-1]

    yield make
    for r in made:
        r.device.close()


async def test_a_device_downloads_its_release_over_https_with_a_url_signed_for_it(
    secure_api: ApiProcess, secure_key: Callable[..., Any], secure_db: asyncpg.Pool[Any],
    requesters: Callable[[str, str], Requester], tls_files: TlsFiles, uid: str,
) -> None:
    c = client(secure_api, await secure_key("admin"))
    keys = {}
    for name in ("a", "b"):
        made = c.post("/v1/devices", json={"id": f"{uid}-{name}", "tags": {"run": uid}})
        assert made.status_code == 201, made.text
        keys[name] = made.json()["credentials"]["key"]
    a = requesters(f"{uid}-a", keys["a"])
    b = requesters(f"{uid}-b", keys["b"])
    image = bytes(range(256)) * 40
    fid = declare(c, image, "5.0.0", f"board-{uid}").json()["id"]
    assert put_part(c, fid, image, 0, len(image) - 1).status_code == 200
    # Not yet part of a rollout: no URL.
    assert a.ask({"id": "r0", "op": "download", "firmware": fid}) == {
        "id": "r0", "status": 403, "error": f"no rollout of firmware {fid} is updating this device"}
    job = c.post("/v1/jobs", json={"type": "rollout", "query": f"id = '{a.device_id}'",
                                   "firmware_id": fid})
    assert job.status_code == 201, job.text
    await wait_until_notified(secure_db, job.json()["id"], a.device_id)

    answer = a.ask({"id": "r1", "op": "download", "firmware": fid})
    assert answer["status"] == 200 and answer["id"] == "r1", answer
    assert (answer["size"], answer["sha256"]) == (len(image), hashlib.sha256(image).hexdigest())
    url = answer["url"]
    assert url.startswith(f"{secure_api.device_url}/v1/transfers/")
    assert time.time() + 800 < answer["expires_at"] <= time.time() + 900
    verify = ssl.create_default_context(cafile=tls_files.ca_cert)
    with httpx.Client(verify=verify, timeout=10) as https:
        whole = https.get(url, headers=a.authorization())
        assert whole.status_code == 200 and whole.content == image
        assert whole.headers["etag"] == f'"{answer["sha256"]}"'
        # Resumed where it stopped.
        rest = https.get(url, headers={**a.authorization(), "Range": "bytes=4000-"})
        assert rest.status_code == 206 and rest.content == image[4000:]
        assert rest.headers["content-range"] == f"bytes 4000-{len(image) - 1}/{len(image)}"
        # The device must prove itself, and be the one the URL was signed for.
        assert_problem(https.get(url), 401, "must prove itself")
        bad = {"Authorization": f"SharedAccessSignature sr={a.device_id}&sig=AAAA&se=9999999999"}
        assert_problem(https.get(url, headers=bad), 401, "bad or expired")
        assert_problem(https.get(url, headers={"Authorization": "Bearer x"}), 401)
        assert_problem(https.get(url, headers=b.authorization()), 403, "another device")
        # Forged, altered or expired URLs.
        head, _, tail = url.rpartition("/")[2].partition(".")
        assert_problem(https.get(f"{secure_api.device_url}/v1/transfers/{head}.{tail[::-1]}",
                                 headers=a.authorization()), 403, "not a transfer URL")
        key = grants.grant_key(DEVICE_KEY_SECRET.encode())
        for grant, why in (
            (grants.Grant("firmware", a.device_id, fid, int(time.time()) - 1), "expired"),
            (grants.Grant("upload", a.device_id, fid, int(time.time()) + 60), "not a firmware"),
        ):
            forged = f"{secure_api.device_url}/v1/transfers/{grants.sign(key, grant)}"
            assert_problem(https.get(forged, headers=a.authorization()), 403, why)
        # Only what devices use answers on their port.
        assert_problem(https.get(f"{secure_api.device_url}/v1/devices"), 404, "devices' listener")
        assert https.get(f"{secure_api.device_url}/healthz").status_code == 200
    # Another device may not download it, and requests must be well formed.
    assert b.ask({"id": 7, "op": "download", "firmware": fid})["status"] == 403
    assert a.ask({"id": "r2", "op": "download"})["status"] == 400
    assert a.ask({"id": "r3", "op": "format"})["error"] == "op is download or upload"
    assert a.ask(b"\xff not json")["status"] == 400
    assert a.ask(b"x" * 2000)["status"] == 400
    c.post(f"/v1/jobs/{job.json()['id']}/cancel")
    # The access log shows transfer requests without their grant.
    logged = secure_api.log_path.read_text()
    assert "/v1/transfers/<grant>" in logged and url.rpartition("/")[2] not in logged


async def wait_until_notified(secure_db: asyncpg.Pool[Any], job_id: int, device_id: str) -> None:
    for _ in range(300):
        phase = await secure_db.fetchval(
            "SELECT phase FROM job_devices WHERE job_id = $1 AND device_id = $2", job_id, device_id)
        if phase is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{device_id} was not notified")

