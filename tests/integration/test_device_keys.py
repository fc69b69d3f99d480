"""Device credentials over REST: a key shown once, regenerated, and SAS tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from fleetline import devicekeys
from tests.integration.test_api import assert_problem, client
from tests.support import DEVICE_KEY_SECRET, ApiProcess

pytestmark = pytest.mark.integration
SECRET = DEVICE_KEY_SECRET.encode()


async def test_create_issues_a_key_once_and_regenerating_replaces_it(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    c = client(api, await make_key("devices:write", "devices:read"))
    device_id = f"{uid}-k"
    created = c.post("/v1/devices", json={"id": device_id, "tags": {"site": "A"}})
    assert created.status_code == 201, created.text
    body = created.json()
    creds = body["credentials"]
    version = body["key_version"]
    assert creds["key_version"] == version >= 1
    key = creds["key"]
    assert key == devicekeys.derive_key(SECRET, device_id, version)
    assert creds["connection_string"] == (
        f"HostName=127.0.0.1;Port={api.env['FLEETLINE_MQTT_URL'].rsplit(':', 1)[1]};"
        f"DeviceId={device_id};SharedAccessKey={key}"
    )
    # Shown once: neither the device nor the list carries it again; the database keeps
    # a fingerprint only.
    assert key not in c.get(f"/v1/devices/{device_id}").text
    assert key not in c.get("/v1/devices", params={"tag": "site=A"}).text
    row = await db.fetchrow("SELECT * FROM devices WHERE id = $1", device_id)
    assert row["key_sha256"] == devicekeys.fingerprint(key)
    assert key.encode() not in b"".join(str(v).encode() for v in row.values())

    renewed = c.post(f"/v1/devices/{device_id}/key")
    assert renewed.status_code == 200, renewed.text
    new_key = renewed.json()["key"]
    new_version = renewed.json()["key_version"]
    assert new_version > version and new_key != key
    assert new_key == devicekeys.derive_key(SECRET, device_id, new_version)
    assert c.get(f"/v1/devices/{device_id}").json()["key_version"] == new_version
    assert_problem(c.post(f"/v1/devices/{uid}-none/key"), 404)

    # Deleted and registered again, the device gets a key never issued before: the old
    # device's keys (and tokens) stay dead.
    assert c.delete(f"/v1/devices/{device_id}").status_code == 204
    again = c.post("/v1/devices", json={"id": device_id}).json()["credentials"]
    assert again["key_version"] > new_version and again["key"] not in (key, new_key)


async def test_tokens_are_signed_with_the_current_key(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    c = client(api, await make_key("devices:write"))
    device_id = f"{uid}-t"
    key = c.post("/v1/devices", json={"id": device_id}).json()["credentials"]["key"]
    resp = c.post(f"/v1/devices/{device_id}/token", json={"ttl_s": 120})
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    expires = datetime.fromisoformat(resp.json()["expires_at"]).timestamp()
    assert abs(expires - (time.time() + 120)) < 5
    assert devicekeys.verify_password(key, device_id, token)
    assert not devicekeys.verify_password(key, device_id, token, now=expires + 1)
    assert not devicekeys.verify_password(key, f"{device_id}x", token)
    # Default one hour; a regenerated key invalidates the tokens of the old one.
    default = c.post(f"/v1/devices/{device_id}/token").json()
    assert abs(datetime.fromisoformat(default["expires_at"]).timestamp() - time.time() - 3600) < 5
    new_key = c.post(f"/v1/devices/{device_id}/key").json()["key"]
    assert not devicekeys.verify_password(new_key, device_id, token)
    assert_problem(c.post(f"/v1/devices/{device_id}/token", json={"ttl_s": 0}), 422)
    assert_problem(c.post(f"/v1/devices/{uid}-none/token"), 404)
    # A device registered without a key (before credentials existed) has none to sign with.
    await db.execute("INSERT INTO devices (id) VALUES ($1)", f"{uid}-old")
    assert_problem(c.post(f"/v1/devices/{uid}-old/token"), 409, "no key")


async def test_dead_letters_are_listed_newest_first_with_their_reason(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    device_id = f"{uid}-dl"
    await db.executemany(
        "INSERT INTO ingest_dead_letter (topic, device_id, reason, payload) VALUES ($1,$2,$3,$4)",
        [(f"devices/{device_id}/telemetry", device_id, f"reason {i}", b"\xff{bad" * (i + 1))
         for i in range(3)],
    )
    c = client(api, await make_key("telemetry:read"))
    first = c.get("/v1/dead-letters", params={"device_id": device_id, "limit": 2}).json()
    assert [i["reason"] for i in first["items"]] == ["reason 2", "reason 1"]
    assert first["items"][0]["payload_size"] == 15
    assert first["items"][0]["payload_text"].startswith("\ufffd{bad")
    rest = c.get("/v1/dead-letters", params={"device_id": device_id,
                                             "cursor": first["next_cursor"]}).json()
    assert [i["reason"] for i in rest["items"]] == ["reason 0"] and rest["next_cursor"] is None
    assert_problem(client(api, await make_key("devices:read")).get("/v1/dead-letters"), 403)
