"""The migration runner against a real server."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline.migrate import (
    MigrationError,
    apply_migrations,
    load_definitions,
    load_migrations,
    migrations_dir,
)
from fleetline.settings import StorageSettings
from tests.conftest import Backend, _with_database

pytestmark = pytest.mark.integration
PLAIN = StorageSettings(timescale="off")
# The body of a function defined in migrations/functions/ (its five-argument form).
SOURCE = "SELECT prosrc FROM pg_proc WHERE proname = 'fleetline_apply_reported' AND pronargs = 5"


@pytest.fixture
async def fresh_db(backend: Backend) -> AsyncIterator[str]:
    """An empty database on the test's backend (plain PostgreSQL unless marked storage)."""
    name = f"fleetline_mig_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(backend.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield _with_database(backend.admin_url, name)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


@pytest.mark.storage
async def test_concurrent_runners_apply_each_migration_once(
    fresh_db: str, backend: Backend
) -> None:
    cons = [await asyncpg.connect(fresh_db) for _ in range(3)]
    applied = await asyncio.gather(*(apply_migrations(c, backend.storage) for c in cons))
    assert sorted(len(a) for a in applied) == [0, 0, len(load_migrations())]
    versions = await cons[0].fetch("SELECT version FROM schema_migrations ORDER BY 1")
    assert [r["version"] for r in versions] == [m.version for m in load_migrations()]
    assert await cons[0].fetchval("SELECT timescale FROM storage_config") is backend.timescale
    for c in cons:
        await c.close()


async def migrated_then_edited(
    database: str, tmp_path: Path, relative: str, edit: Callable[[str], str],
    storage: StorageSettings = PLAIN,
) -> tuple[asyncpg.Connection[Any], Path]:
    """The database migrated, and a copy of the migrations with ``relative`` edited."""
    con = await asyncpg.connect(database)
    await apply_migrations(con, storage)
    edited = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), edited)
    path = edited / relative
    path.write_text(edit(path.read_text()))
    return con, edited


async def test_an_edited_applied_migration_stops_the_run(fresh_db: str, tmp_path: Path) -> None:
    first = sorted(migrations_dir().glob("*.sql"))[0].name
    con, edited = await migrated_then_edited(
        fresh_db, tmp_path, first, lambda sql: sql + "\n-- changed\n"
    )
    with pytest.raises(MigrationError, match="was edited after it was applied"):
        await apply_migrations(con, PLAIN, directory=edited)
    await con.close()


def migrate_cli(database: str, timescale: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetline_cli", "migrate"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "FLEETLINE_DATABASE_URL": database,
                          "FLEETLINE_STORAGE_TIMESCALE": timescale,
                          "FLEETLINE_LOG_FORMAT": "console"})


async def installed_not_preloaded(database: str) -> None:
    """The test server (scripts/ensure-services.sh test) has TimescaleDB's files
    installed and does not preload it, as a first install often is."""
    con = await asyncpg.connect(database)
    try:
        available = await con.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")
        preload = await con.fetchval("SELECT current_setting('shared_preload_libraries')")
    finally:
        await con.close()
    assert available, "TimescaleDB is not installed in the test server: run `make test`"
    assert "timescaledb" not in preload


async def test_timescale_installed_but_not_preloaded(fresh_db: str) -> None:
    """`on` fails in one line that says what to add; `auto` warns once, naming the fix,
    and migrates onto plain PostgreSQL. Neither tries CREATE EXTENSION, which would fail
    and close the connection."""
    await installed_not_preloaded(fresh_db)
    refused = migrate_cli(fresh_db, "on")
    assert refused.returncode == 1, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: FLEETLINE_STORAGE_TIMESCALE=on, but the timescaledb extension is installed but "
        "not preloaded: add shared_preload_libraries = 'timescaledb' to postgresql.conf and "
        "restart PostgreSQL"], refused.stderr
    assert "Traceback" not in refused.stderr
    done = migrate_cli(fresh_db, "auto")
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert output.count("shared_preload_libraries = 'timescaledb'") == 1, output
    assert "Traceback" not in output
    con = await asyncpg.connect(fresh_db)
    assert await con.fetchval("SELECT timescale FROM storage_config") is False
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


def _bodies(sql: str) -> set[str]:
    """The bodies ($$ ... $$) of the functions a definition file creates."""
    return {body.strip() for body in sql.split("$$")[1::2]}


@pytest.mark.storage
async def test_each_redefined_function_has_its_current_body_in_one_file(
    fresh_db: str, backend: Backend
) -> None:
    con = await asyncpg.connect(fresh_db)
    await apply_migrations(con, backend.storage)
    definitions = load_definitions()
    assert {d.name for d in definitions} >= {"fleetline_apply_reported"}
    recorded = await con.fetch("SELECT name, checksum FROM schema_definitions")
    assert {r["name"]: r["checksum"] for r in recorded} == {d.name: d.checksum for d in definitions}
    for d in definitions:
        live = await con.fetch("SELECT prosrc FROM pg_proc WHERE proname = $1", d.name)
        assert {r["prosrc"].strip() for r in live} == _bodies(d.sql), d.name
    # No numbered migration after the one a definition names as its last change redefines
    # the function: its current body is the file's.
    for d in definitions:
        last = max(m.version for m in load_migrations() if f"FUNCTION {d.name}(" in m.sql)
        assert f"last changed by {last:04d}" in d.sql, d.name
    await con.close()


@pytest.mark.storage
async def test_a_changed_definition_is_applied_again(
    fresh_db: str, tmp_path: Path, backend: Backend
) -> None:
    con, edited = await migrated_then_edited(
        fresh_db,
        tmp_path,
        "functions/fleetline_apply_reported.sql",
        lambda sql: sql.replace("BEGIN\n", "BEGIN\n    -- edited\n", 1).replace(
            "-- revision: 1", "-- revision: 2"
        ),
        backend.storage,
    )
    assert await apply_migrations(con, backend.storage, directory=edited) == []
    src = await con.fetchval(SOURCE)
    assert "-- edited" in src
    checksums = {d.name: d.checksum for d in load_definitions(edited)}
    assert await con.fetchval(
        "SELECT checksum FROM schema_definitions WHERE name = 'fleetline_apply_reported'"
    ) == checksums["fleetline_apply_reported"]
    await con.close()


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        # Changed but not given a new revision.
        (lambda sql: sql.replace("BEGIN\n", "BEGIN\n    -- edited\n", 1),
         "changed without a new revision"),
        # An older release against a database a newer one migrated.
        (lambda sql: sql.replace("-- revision: 1", "-- revision: 0"), "newer than this code's"),
    ],
    ids=["same-revision", "older-revision"],
)
async def test_a_definition_is_never_silently_changed_or_downgraded(
    fresh_db: str, tmp_path: Path, edit: Callable[[str], str], refusal: str
) -> None:
    con, edited = await migrated_then_edited(
        fresh_db, tmp_path, "functions/fleetline_apply_reported.sql", edit
    )
    before = await con.fetchval(SOURCE)
    with pytest.raises(MigrationError, match=refusal):
        await apply_migrations(con, PLAIN, directory=edited)
    after = await con.fetchval(SOURCE)
    assert after == before
    await con.close()


async def test_rollups_kept_by_marks_carry_over_exactly_when_they_become_incremental(
    fresh_db: str, tmp_path: Path
) -> None:
    """Migration 0022: minutes still marked (settled or not) and those already rolled up
    both end up equal to their raw rows, and later writes add to them."""
    before = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), before)
    for path in before.glob("*.sql"):
        if int(path.name[:4]) >= 22:
            path.unlink()
    con = await asyncpg.connect(fresh_db)
    await apply_migrations(con, PLAIN, directory=before)
    sid = await con.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ('d', 'v') RETURNING id")
    hour = await con.fetchval("SELECT date_trunc('hour', now()) - interval '3 hours'")
    # Before 03:00 UTC that hour is yesterday's, whose partition a new database lacks.
    await con.execute("SELECT fleetline_ensure_partition($1)", hour)
    rows = [(sid, hour + timedelta(seconds=7 * i), float(i % 17), None) for i in range(900)]
    cols = ["series_id", "ts", "value", "value_text"]
    await con.copy_records_to_table("telemetry", records=rows[:600], columns=cols)
    assert await con.fetchval("SELECT fleetline_roll_up(100000)") > 0
    await con.copy_records_to_table("telemetry", records=rows[600:], columns=cols)
    # The current minute, marked and not yet rolled up.
    await con.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, now(), 1)", sid)
    await apply_migrations(con, PLAIN)
    await con.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, now(), 99)", sid)
    # A late reading into a migrated minute, before its last one: `last` stays (last_ts
    # was carried over from the raw rows).
    await con.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, -7)",
                      sid, hour + timedelta(seconds=7 * 599 - 3))
    for view, width in (("readings_1m", "1 minute"), ("readings_1h", "1 hour")):
        raw = await con.fetch(
            f"""SELECT date_bin('{width}', time, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
                       count(*), max(value),
                       (array_agg(value ORDER BY time DESC))[1] AS last
                FROM readings GROUP BY 1 ORDER BY 1""")
        rolled = await con.fetch(
            f"SELECT bucket, count, max, last FROM {view} ORDER BY 1")
        assert [(r["bucket"], r["count"], r["max"], r["last"]) for r in rolled] == [
            (r["bucket"], r["count"], r["max"], r["last"]) for r in raw], view
    # Kept for one release, empty, with a no-op roll-up: the previous release's API and
    # ingest go on working during a rolling upgrade.
    assert await con.fetchval("SELECT count(*) FROM rollup_pending") == 0
    assert await con.fetchval("SELECT fleetline_roll_up(100)") == 0
    await con.close()
