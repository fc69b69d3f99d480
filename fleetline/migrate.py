"""Apply the numbered SQL files of ``migrations/`` in order, once each.

Forward-only: applied files are recorded in ``schema_migrations`` with a checksum, and
an applied file that changed afterwards stops the run (write a new file instead). A
session advisory lock makes concurrent runners (a k8s Job and a developer, two
replicas starting) take turns. A file whose first line is ``-- no-transaction`` runs
outside a transaction and holds one statement (several statements sent at once run in
one implicit transaction, where ``CREATE INDEX CONCURRENTLY`` fails); every other file
runs in its own transaction.

The runner passes the storage settings to the SQL as session settings
(``fleetline.timescale``, ``fleetline.raw_retention``...), so no interval is hard-coded
in a migration.

A function whose body changes after the migration that created it lives in
``migrations/functions/<name>.sql`` (``CREATE OR REPLACE``), its current body in one place,
with a ``-- revision: N`` line raised at every change. After the numbered files, the
runner applies each definition whose revision is newer than the one recorded in
``schema_definitions`` (so on a new database, and after each change); an older revision
(an older release migrating a newer database) and a changed file with the same revision
stop the run. The numbered files keep the bodies they were applied with; a numbered
migration that calls such a function gets, on a new database, the body of the numbered
migrations before it, not the file's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from fleetline.db import close_connection
from fleetline.files import ProjectFileError, project_path
from fleetline.settings import StorageSettings

log = logging.getLogger(__name__)

LOCK_KEY = 0x666C6565  # "flee": one advisory lock id for all fleetline migration runners
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
DEFINITIONS_FOLDER = "functions"
_DEFINITION_RE = re.compile(r"^[a-z][a-z0-9_]*\.sql$")
_REVISION_RE = re.compile(r"^-- revision: (\d+)$", re.M)


class MigrationError(Exception):
    """The migrations cannot be applied as they are."""


@dataclass(frozen=True)
class Definition:
    """The current definition of one function (``migrations/functions/<name>.sql``)."""

    name: str
    revision: int
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().lower().startswith("-- no-transaction")


def migrations_dir() -> Path:
    """``FLEETLINE_MIGRATIONS_DIR``, else the migrations this installation carries."""
    override = os.environ.get("FLEETLINE_MIGRATIONS_DIR")
    if override:
        return Path(override)
    try:
        return project_path("migrations")
    except ProjectFileError as exc:
        raise MigrationError(str(exc)) from None


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_verb_object.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number in {directory}")
    return found


def load_definitions(directory: Path | None = None) -> list[Definition]:
    folder = (directory or migrations_dir()) / DEFINITIONS_FOLDER
    if not folder.is_dir():
        log.warning("no function definitions in %s: their functions keep older bodies", folder)
        return []
    found: list[Definition] = []
    for path in sorted(folder.glob("*.sql")):
        if not _DEFINITION_RE.match(path.name):
            raise MigrationError(f"{path.name}: function definitions are named <function>.sql")
        sql = path.read_text()
        revision = _REVISION_RE.search(sql)
        if revision is None:
            raise MigrationError(f"{path.name}: a definition needs a '-- revision: N' line")
        found.append(Definition(path.stem, int(revision.group(1)), sql))
    return found


PRELOAD_FIX = (
    "add shared_preload_libraries = 'timescaledb' to postgresql.conf and restart PostgreSQL"
)


async def timescale_problem(con: asyncpg.Connection[Any]) -> str | None:
    """Why TimescaleDB cannot be used on this server (None: it can). The extension must be
    installed and preloaded: with its files installed but not in shared_preload_libraries
    (a common first install), CREATE EXTENSION fails and closes the connection."""
    installed = await con.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
    )
    if not installed:
        return "the server has no timescaledb extension"
    # Loaded: its library's settings are registered (shared_preload_libraries loads it
    # at start). Created in the database is not enough: a server restarted without the
    # preload still has the row, and every use of the extension fails.
    loaded = await con.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name LIKE 'timescaledb.%')"
    )
    if not loaded:
        return f"the timescaledb extension is installed but not preloaded: {PRELOAD_FIX}"
    return None


async def _session_settings(con: asyncpg.Connection[Any], storage: StorageSettings) -> bool:
    problem = None if storage.timescale == "off" else await timescale_problem(con)
    if storage.timescale == "on" and problem is not None:
        raise MigrationError(f"FLEETLINE_STORAGE_TIMESCALE=on, but {problem}")
    use_timescale = storage.timescale != "off" and problem is None
    if storage.timescale == "auto" and problem is not None and "preloaded" in problem:
        # Installed but unusable: worth one warning (not having it at all is not).
        log.warning("storage on plain PostgreSQL partitions: %s", problem)
    values = {
        "fleetline.timescale": "on" if use_timescale else "off",
        "fleetline.raw_retention": storage.raw_retention,
        "fleetline.partition_interval": storage.partition_interval,
        "fleetline.partitions_ahead": str(storage.partitions_ahead),
        "fleetline.compress_after": storage.compress_after,
        "fleetline.rollup_1m_retention": storage.rollup_1m_retention,
        "fleetline.rollup_1h_retention": storage.rollup_1h_retention,
    }
    for key, value in values.items():
        await con.execute("SELECT set_config($1, $2, false)", key, value)
    return use_timescale


async def apply_migrations(
    con: asyncpg.Connection[Any],
    storage: StorageSettings,
    *,
    directory: Path | None = None,
) -> list[Migration]:
    """Apply what is pending, then the function definitions that changed; return the
    migrations applied by this call."""
    migrations = load_migrations(directory)
    definitions = load_definitions(directory)
    await con.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await con.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     INTEGER PRIMARY KEY,
                name        TEXT NOT NULL,
                checksum    TEXT NOT NULL,
                applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
                duration_ms INTEGER NOT NULL
            )
            """
        )
        applied = {r["version"]: r for r in await con.fetch("SELECT * FROM schema_migrations")}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(
                f"the database has migrations {unknown} that this code does not know; "
                "is an older version of fleetline running against a newer schema?"
            )
        for m in migrations:
            row = applied.get(m.version)
            if row is not None and row["checksum"] != m.checksum:
                raise MigrationError(
                    f"migration {m.version:04d}_{m.name} was edited after it was applied; "
                    "applied migrations are never changed, add a new file instead"
                )
        pending = [m for m in migrations if m.version not in applied]
        if pending:
            await _apply(con, storage, pending)
        else:
            log.info("schema is up to date", extra={"version": max(known, default=0)})
        await _define(con, definitions)
        return pending
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def _apply(
    con: asyncpg.Connection[Any], storage: StorageSettings, pending: list[Migration]
) -> None:
    use_timescale = await _session_settings(con, storage)
    log.info(
        "applying %d migration(s)",
        len(pending),
        extra={"storage": "timescaledb" if use_timescale else "partitioned"},
    )
    for m in pending:
        started = time.perf_counter()
        try:
            if m.transactional:
                async with con.transaction():
                    await con.execute(m.sql)
                    await _record(con, m, started)
            else:
                await con.execute(m.sql)
                await _record(con, m, started)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
        log.info(
            "applied migration %04d_%s",
            m.version,
            m.name,
            extra={"duration_ms": round((time.perf_counter() - started) * 1000)},
        )


async def _define(con: asyncpg.Connection[Any], definitions: list[Definition]) -> None:
    """(Re)create each function whose definition is new or of a newer revision, each in
    its own transaction."""
    await con.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_definitions (
            name        TEXT PRIMARY KEY,
            revision    INTEGER NOT NULL,
            checksum    TEXT NOT NULL,
            applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        )
        """
    )
    # A table made before revisions were recorded: its definitions count as revision 0.
    await con.execute(
        "ALTER TABLE schema_definitions "
        "ADD COLUMN IF NOT EXISTS revision INTEGER NOT NULL DEFAULT 0"
    )
    rows = await con.fetch("SELECT name, revision, checksum FROM schema_definitions")
    recorded = {r["name"]: (r["revision"], r["checksum"]) for r in rows}
    for d in definitions:
        revision, checksum = recorded.get(d.name, (-1, ""))
        if d.revision < revision:
            raise MigrationError(
                f"the database holds revision {revision} of {d.name}, newer than this code's "
                f"{d.revision}; is an older version of fleetline running against a newer schema?"
            )
        if d.revision == revision:
            if d.checksum != checksum:
                raise MigrationError(
                    f"migrations/functions/{d.name}.sql changed without a new revision: "
                    "raise its '-- revision:' line"
                )
            continue
        try:
            async with con.transaction():
                await con.execute(d.sql)
                await con.execute(
                    "INSERT INTO schema_definitions (name, revision, checksum) "
                    "VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET "
                    "revision = excluded.revision, checksum = excluded.checksum, "
                    "applied_at = now()",
                    d.name,
                    d.revision,
                    d.checksum,
                )
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"function definition {d.name} failed: {exc}") from exc
        log.info("applied function definition %s", d.name)


async def _record(con: asyncpg.Connection[Any], m: Migration, started: float) -> None:
    await con.execute(
        "INSERT INTO schema_migrations (version, name, checksum, duration_ms) "
        "VALUES ($1, $2, $3, $4)",
        m.version,
        m.name,
        m.checksum,
        round((time.perf_counter() - started) * 1000),
    )


async def ensure_database(dsn: str) -> None:
    """Create the database named in ``dsn`` if the server does not have it yet."""
    try:
        con = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await close_connection(con)
        return
    database = urlsplit(dsn).path.lstrip("/")
    if not database or '"' in database:
        raise MigrationError(f"cannot create database {database!r}: name it in the URL path")
    admin = await asyncpg.connect(dsn, database="postgres")
    try:
        log.info("creating database %s", database)
        await admin.execute(f'CREATE DATABASE "{database}"')
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await close_connection(admin)


async def migrate(dsn: str, storage: StorageSettings, *, create_database: bool = True) -> int:
    if create_database:
        await ensure_database(dsn)
    con = await asyncpg.connect(dsn)
    try:
        return len(await apply_migrations(con, storage))
    finally:
        await close_connection(con)
