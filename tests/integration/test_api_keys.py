"""API keys over REST (/v1/apikeys), against the API as a process: admin keys make scoped
keys whose token is shown once, list them without secrets and revoke them (never the last
admin key); the bootstrap token makes the first admin key only, only while no active admin
key exists, once under a race, and is accepted nowhere else."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

from fleetline_api.settings import ApiSettings
from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import Backend, migrated_database
from tests.integration.test_api import assert_problem, client
from tests.integration.test_cli import fleetline
from tests.support import DEVICE_KEY_SECRET, ApiProcess

pytestmark = pytest.mark.integration


async def test_admin_keys_make_list_and_revoke_scoped_keys(
    api: ApiProcess, make_key: Callable[..., Any]
) -> None:
    admin_token = await make_key("admin")
    reader_token = await make_key("devices:read")
    with client(api, admin_token) as admin, client(api, reader_token) as reader, \
            client(api) as anonymous:
        body = {"name": "ops dashboard", "scopes": ["devices:read", "devices:read"]}
        assert_problem(anonymous.post("/v1/apikeys", json=body), 401)
        assert_problem(reader.post("/v1/apikeys", json=body), 403, "admin")
        assert_problem(reader.get("/v1/apikeys"), 403)
        assert_problem(admin.post("/v1/apikeys", json={"name": "x", "scopes": ["root"]}), 422)
        assert_problem(admin.post("/v1/apikeys", json={"name": "", "scopes": ["admin"]}), 422)
        assert_problem(admin.post("/v1/apikeys", json={"name": "x", "scopes": []}), 422)

        made = admin.post("/v1/apikeys", json=body)
        assert made.status_code == 201, made.text
        key = made.json()
        assert key["scopes"] == ["devices:read"] and key["state"] == "active"
        assert key["name"] == "ops dashboard" and key["revoked_at"] is None
        token = key["token"]
        assert token.startswith(f"flk_{key['id']}_")
        secret = token.split("_", 2)[2]

        # The scopes are enforced: it reads devices, and may not write them or make keys.
        with client(api, token) as made_key:
            assert made_key.get("/v1/devices").status_code == 200
            assert_problem(made_key.post("/v1/devices", json={"id": "nope"}), 403)
            assert_problem(made_key.post("/v1/apikeys", json=body), 403)

            # Listed without its token or secret, ever.
            listed = admin.get("/v1/apikeys")
            assert listed.status_code == 200
            [mine] = [k for k in listed.json()["items"] if k["id"] == key["id"]]
            assert "token" not in mine and mine["scopes"] == ["devices:read"]
            assert secret not in listed.text and "secret" not in listed.text

            # Revoked: refused at once; a second revocation finds no active key.
            admin_id = admin_token.split("_")[1]
            assert_problem(admin.delete(f"/v1/apikeys/{admin_id}"), 409, "itself")
            assert admin.delete(f"/v1/apikeys/{key['id']}").status_code == 204
            assert_problem(made_key.get("/v1/devices"), 401)
            assert_problem(admin.delete(f"/v1/apikeys/{key['id']}"), 404)
            assert_problem(admin.delete("/v1/apikeys/nosuchkey000"), 404)
            assert_problem(admin.delete("/v1/apikeys/NOT-AN-ID"), 422)
        revoked = admin.get("/v1/apikeys", params={"state": "revoked"}).json()["items"]
        assert key["id"] in {k["id"] for k in revoked}
        assert all(k["state"] == "revoked" and k["revoked_at"] for k in revoked)
        active = admin.get("/v1/apikeys", params={"state": "active"}).json()["items"]
        assert key["id"] not in {k["id"] for k in active}

        # This API has no bootstrap token: a token that is not a key is just unknown.
        with client(api, "x" * 40) as stranger:
            assert_problem(stranger.post("/v1/apikeys", json=body), 401)


def test_a_short_bootstrap_token_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLINE_DEVICE_KEY_SECRET", DEVICE_KEY_SECRET)
    with pytest.raises(ValidationError, match="at least 32 characters"):
        ApiSettings(bootstrap_token="too-short")
    assert ApiSettings(bootstrap_token="").bootstrap_token is None
    token = ApiSettings(bootstrap_token="b" * 32).bootstrap_token
    assert token is not None and "b" * 32 not in repr(token)


async def test_the_bootstrap_token_makes_keys_only_while_no_admin_key_exists(
    backend: Backend, broker: LocalMosquitto, artifacts: Path, uid: str, tmp_path: Path
) -> None:
    bootstrap = secrets.token_hex(32)
    async with migrated_database(backend.admin_url, "fleetline_bootstrap") as url:
        proc = ApiProcess(database_url=url, mqtt_url=broker.url, log_dir=artifacts,
                          name=f"bootstrap-{uid}",
                          env={"FLEETLINE_API_BOOTSTRAP_TOKEN": bootstrap})
        proc.start()
        try:
            await _bootstrap(proc, url, bootstrap, tmp_path)
        finally:
            proc.stop()
        # Never logged.
        assert bootstrap not in proc.log_path.read_text()


async def _bootstrap(proc: ApiProcess, url: str, bootstrap: str, tmp_path: Path) -> None:
    admin = {"name": "first admin", "scopes": ["admin"]}
    with client(proc, bootstrap) as boot, client(proc, "0" * 64) as wrong:
        # A wrong token is an unknown credential; the right one works on this route only.
        assert_problem(wrong.post("/v1/apikeys", json=admin), 401)
        assert_problem(boot.get("/v1/apikeys"), 401)
        assert_problem(boot.get("/v1/devices"), 401)
        # An admin key only: other keys are made with that one.
        reader = {"name": "reader", "scopes": ["telemetry:read"]}
        assert_problem(boot.post("/v1/apikeys", json=reader), 403, 'scopes ["admin"]')
        wider = {**admin, "scopes": ["admin", "devices:read"]}
        assert_problem(boot.post("/v1/apikeys", json=wider), 403, "only the first admin key")

    # The command line takes the token too (from a file), for the first admin key only.
    token_file = tmp_path / "bootstrap"
    token_file.write_text(f"{bootstrap}\n")
    env = {"FLEETLINE_API_URL": proc.url, "FLEETLINE_DATABASE_URL": "postgresql://x@127.0.0.1:9/x"}
    refused = fleetline("apikey", "create", "-s", "telemetry:read", "--bootstrap-token-file",
                        str(token_file), env=env)
    assert refused.returncode == 1 and 'scopes ["admin"]' in refused.stderr, refused
    token_file.write_text("\n")
    empty = fleetline("apikey", "create", "-s", "admin", "--bootstrap-token-file",
                      str(token_file), env=env)
    assert empty.returncode == 1 and "no bootstrap token in" in empty.stderr, empty

    # Racing for the first admin key: exactly one wins.
    async with httpx.AsyncClient(base_url=proc.url, timeout=10,
                                 headers={"Authorization": f"Bearer {bootstrap}"}) as racer:
        answers = await asyncio.gather(*(racer.post("/v1/apikeys", json=admin)
                                          for _ in range(6)))
    assert sorted(a.status_code for a in answers) == [201, 403, 403, 403, 403, 403]
    [first] = [a.json() for a in answers if a.status_code == 201]
    for refused in (a for a in answers if a.status_code == 403):
        assert_problem(refused, 403, "only while no active admin key exists")

    with client(proc, first["token"]) as first_admin, client(proc, bootstrap) as boot:
        assert first_admin.post("/v1/apikeys", json=reader).status_code == 201
        second = first_admin.post("/v1/apikeys", json={"name": "second", "scopes": ["admin"]})
        assert second.status_code == 201
        with client(proc, second.json()["token"]) as second_admin:
            # With the first revoked, the second admin key still shuts the token out.
            assert second_admin.delete(f"/v1/apikeys/{first['id']}").status_code == 204
            assert_problem(boot.post("/v1/apikeys", json=admin), 403)
            assert_problem(first_admin.get("/v1/apikeys"), 401)
            listed = second_admin.get("/v1/apikeys").json()["items"]
            assert [k["name"] for k in listed] == ["first admin", "reader", "second"]
            # Two admins revoking each other at once leave one of them: REST never
            # revokes the last active admin key (then no one could make or revoke keys).
            third = second_admin.post("/v1/apikeys", json={"name": "third", "scopes": ["admin"]})
            pair = [second.json(), third.json()]
        for _ in range(3):
            async with httpx.AsyncClient(base_url=proc.url, timeout=10) as racer:
                answers = await asyncio.gather(*(
                    racer.delete(f"/v1/apikeys/{other['id']}",
                                 headers={"Authorization": f"Bearer {me['token']}"})
                    for me, other in (pair, pair[::-1])))
            codes = [a.status_code for a in answers]
            assert sorted(codes) in ([204, 401], [204, 409]), [a.text for a in answers]
            survivor = pair[0] if codes[0] == 204 else pair[1]
            with client(proc, survivor["token"]) as alive:
                active = alive.get("/v1/apikeys", params={"state": "active"}).json()["items"]
                assert [k["id"] for k in active if "admin" in k["scopes"]] == [survivor["id"]]
                made = alive.post("/v1/apikeys", json={"name": "next", "scopes": ["admin"]})
            pair = [survivor, made.json()]
        # Every admin key revoked (here in the database): the token works again.
        con = await asyncpg.connect(url)
        try:
            await con.execute("UPDATE api_keys SET revoked_at = now() WHERE 'admin' = ANY(scopes)")
        finally:
            await con.close()
        again = boot.post("/v1/apikeys", json=admin)
        assert again.status_code == 201, again.text
