"""The migrated schema on a real TimescaleDB server, for the tests in this folder: the
embedded PostgreSQL with TimescaleDB built into it and preloaded (``timescale_server``,
tests/conftest.py). One database for the session, emptied after each test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from fleetline.db import init_connection
from fleetline.migrate import Migration, apply_migrations
from fleetline.settings import StorageSettings
from fleetline_dev.embedded import LocalPostgres
from fleetline_ingest.writer import init_connection as init_ingest_connection

# Every table the migrations create rows in, emptied after each test.
DATA_TABLES = ("telemetry", "series", "devices", "device_activity", "ingest_dead_letter")


@pytest.fixture(scope="session")
async def session_con(timescale_server: LocalPostgres) -> AsyncIterator[asyncpg.Connection[Any]]:
    name = f"fleetline_ts_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(timescale_server.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    con = await asyncpg.connect(timescale_server.url_for(name))
    try:
        await init_connection(con)
        yield con
    finally:
        await con.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
def storage() -> StorageSettings:
    # Deliberately not the defaults ("90 days", "1 day", "7 days"), so the checks prove
    # the hypertable and its policies take their intervals from the settings.
    return StorageSettings(
        timescale="on",
        raw_retention="45 days",
        partition_interval="12 hours",
        compress_after="3 days",
        rollup_1m_retention="20 days",
        rollup_1h_retention="400 days",
    )


@pytest.fixture(scope="session")
async def applied(
    session_con: asyncpg.Connection[Any], storage: StorageSettings
) -> list[Migration]:
    """The migrations applied to the empty database, once per session."""
    applied = await apply_migrations(session_con, storage)
    # What ingest's pool runs on each new connection: its staging table.
    await init_ingest_connection(session_con)
    return applied


@pytest.fixture
async def con(
    session_con: asyncpg.Connection[Any], applied: list[Migration]
) -> AsyncIterator[asyncpg.Connection[Any]]:
    """The migrated database, emptied after each test."""
    assert applied, "the first migration run applied nothing"
    yield session_con
    await session_con.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE")
