"""The API while its database is down, restarting or paused: 503 problems with
Retry-After, never a 500 (found by the chaos suite: a refused connection while the pool
reconnected was an unhandled error), soon rather than after the pool's 30 s command
timeout (a direct method within its own timeout), and answers again once the database is
back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest

from fleetline import apikeys
from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_api.waits import AUTH_TIMEOUT_SECONDS
from fleetline_dev.embedded import LocalMosquitto, LocalPostgres
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess, paused, wait_until

pytestmark = [pytest.mark.integration]

PATHS = ("/v1/devices", "/v1/devices/d-1/latest", "/v1/fleet/counts", "/v1/alarms")


def answers_200(c: httpx.Client) -> bool:
    return all(c.get(p).status_code == 200 for p in PATHS if "latest" not in p)


@asynccontextmanager
async def own_api(tmp_path: Path, broker: LocalMosquitto, artifacts: Path, uid: str
                  ) -> AsyncIterator[tuple[LocalPostgres, ApiProcess, httpx.Client]]:
    """A database of its own (to stop, crash and pause) with the device d-1, the API on
    it, and a client with an admin key."""
    with LocalPostgres(tmp_path / "pg") as pg:
        url = pg.url_for("fleetline")
        await migrate(url, StorageSettings(timescale="off"))
        con = await asyncpg.connect(url)
        try:
            key = (await apikeys.create_key(con, name=uid, scopes=["admin"])).token
            await con.execute("INSERT INTO devices (id) VALUES ('d-1')")
        finally:
            await con.close()
        api = ApiProcess(database_url=url, mqtt_url=broker.url, log_dir=artifacts,
                         name=uid).start()
        try:
            with client(api, key) as c:
                assert answers_200(c)
                yield pg, api, c
            assert "Exception in ASGI application" not in api.log_path.read_text()
        finally:
            api.stop()


async def test_a_database_down_or_restarting_is_a_503_and_the_api_comes_back(
    tmp_path: Path, broker: LocalMosquitto, artifacts: Path, uid: str
) -> None:
    async with own_api(tmp_path, broker, artifacts, uid) as (pg, _api, c):
        for crash in (False, True):
            if crash:
                pg.kill()
            else:
                pg.stop()
            for path in PATHS:
                problem = c.get(path)
                assert_problem(problem, 503, "database")
                assert problem.headers["Retry-After"] == "5"
            pg.start()
            wait_until(lambda c=c: answers_200(c), timeout=30, what="the API back")


async def test_a_paused_database_gets_a_503_within_seconds(
    tmp_path: Path, broker: LocalMosquitto, artifacts: Path, uid: str
) -> None:
    """A stalled database (every process stopped): the key check gives up after
    AUTH_TIMEOUT_SECONDS, where the pool's command timeout would wait 30 s."""
    async with own_api(tmp_path, broker, artifacts, uid) as (pg, _api, c):
        assert pg.pid is not None
        with paused(pg.pid):
            started = time.monotonic()
            assert_problem(c.get("/v1/devices"), 503, "database")
            took = time.monotonic() - started
            assert AUTH_TIMEOUT_SECONDS - 0.5 < took < AUTH_TIMEOUT_SECONDS + 2, took
        wait_until(lambda: answers_200(c), timeout=30, what="the API back")


async def test_a_method_call_waits_for_the_database_no_longer_than_its_timeout(
    tmp_path: Path, broker: LocalMosquitto, artifacts: Path, uid: str
) -> None:
    """The device's online status cannot be read (its table locked): the call answers 503
    at its own timeout_s, having sent nothing."""
    async with own_api(tmp_path, broker, artifacts, uid) as (pg, _api, c):
        con = await asyncpg.connect(pg.url_for("fleetline"))
        try:
            async with con.transaction():
                await con.execute("LOCK TABLE device_activity IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                answer = c.post("/v1/devices/d-1/methods/ping", json={"timeout_s": 2})
                took = time.monotonic() - started
            assert_problem(answer, 503, "of the call's 2 s; nothing was sent")
            assert answer.headers["Retry-After"] == "5"
            assert 1.9 < took < 3.5, took
        finally:
            await con.close()
        # Readable again: the device is offline, which is the answer now.
        assert_problem(c.post("/v1/devices/d-1/methods/ping", json={"timeout_s": 2}), 409)
        # Online, and the timeout counts from the request's arrival: a key check that took
        # 1.5 s of a 2 s call leaves too little for the device, and nothing is sent.
        con = await asyncpg.connect(pg.url_for("fleetline"))
        try:
            await con.execute("INSERT INTO device_activity (device_id, last_seen, online) "
                              "VALUES ('d-1', now(), true)")
            async with con.transaction():
                await con.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
                call = asyncio.ensure_future(asyncio.to_thread(
                    c.post, "/v1/devices/d-1/methods/ping", json={"timeout_s": 2}))
                started = time.monotonic()
                await asyncio.sleep(1.5)
            answer = await call
            took = time.monotonic() - started
            assert_problem(answer, 503, "nothing was sent")
            assert took < 2.5, took
        finally:
            await con.close()
