"""The migration runner against a real server."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from fleetline.migrate import MigrationError, apply_migrations, load_migrations, migrations_dir
from fleetline.settings import StorageSettings

pytestmark = pytest.mark.integration
PLAIN = StorageSettings(timescale="off")


@pytest.fixture
async def fresh_db(admin_url: str) -> AsyncIterator[str]:
    name = f"fleetline_mig_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield admin_url.rpartition("/")[0] + "/" + name
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


async def test_concurrent_runners_apply_each_migration_once(fresh_db: str) -> None:
    cons = [await asyncpg.connect(fresh_db) for _ in range(3)]
    applied = await asyncio.gather(*(apply_migrations(c, PLAIN) for c in cons))
    assert sorted(len(a) for a in applied) == [0, 0, len(load_migrations())]
    versions = await cons[0].fetch("SELECT version FROM schema_migrations ORDER BY 1")
    assert [r["version"] for r in versions] == [m.version for m in load_migrations()]
    assert await cons[0].fetchval("SELECT timescale FROM storage_config") is False
    for c in cons:
        await c.close()


async def test_an_edited_applied_migration_stops_the_run(fresh_db: str, tmp_path: Path) -> None:
    con = await asyncpg.connect(fresh_db)
    await apply_migrations(con, PLAIN)
    edited = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), edited)
    first = sorted(edited.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- changed\n")
    with pytest.raises(MigrationError, match="was edited after it was applied"):
        await apply_migrations(con, PLAIN, directory=edited)
    await con.close()


async def test_timescale_on_without_the_extension_is_refused(fresh_db: str) -> None:
    con = await asyncpg.connect(fresh_db)
    with pytest.raises(MigrationError, match="no timescaledb extension"):
        await apply_migrations(con, StorageSettings(timescale="on"))
    await con.close()


async def test_partitions_are_made_ahead_on_demand_and_dropped_when_expired(
    fresh_db: str,
) -> None:
    con = await asyncpg.connect(fresh_db)
    await apply_migrations(con, PLAIN)
    parts = await con.fetchval(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry'::regclass")
    assert parts == PLAIN.partitions_ahead + 1
    await con.execute("SELECT fleetline_ensure_partition(now() - interval '200 days')")
    assert await con.fetchval("SELECT fleetline_maintain('90 days', 1)") == 1
    await con.close()
