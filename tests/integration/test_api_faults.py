"""The API while its database is down or restarting: 503 problems with Retry-After, never
a 500 (found by the chaos suite: a refused connection while the pool reconnected was an
unhandled error), and answers again once the database is back."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import httpx
import pytest

from fleetline import apikeys
from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_dev.embedded import LocalMosquitto, LocalPostgres
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess, wait_until

pytestmark = [pytest.mark.integration]

PATHS = ("/v1/devices", "/v1/devices/d-1/latest", "/v1/fleet/counts", "/v1/alarms")


def answers_200(c: httpx.Client) -> bool:
    return all(c.get(p).status_code == 200 for p in PATHS if "latest" not in p)


async def test_a_database_down_or_restarting_is_a_503_and_the_api_comes_back(
    tmp_path: Path, broker: LocalMosquitto, artifacts: Path, uid: str
) -> None:
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
            assert "Exception in ASGI application" not in api.log_path.read_text()
        finally:
            api.stop()
