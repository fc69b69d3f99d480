"""Fixtures: a real PostgreSQL database per test run and a real Mosquitto broker.

The PostgreSQL server comes from FLEETLINE_TEST_PG_URL (default: the local server on
127.0.0.1:5432, which `make test` starts if it is not running); each run creates its own
database and drops it at the end. The broker is a Mosquitto process with the project's
configuration on a free port, started here, so every run has its own topic space. A
missing server fails the run; nothing is skipped.

Tests that touch storage (modules or tests marked ``storage``) run twice: on plain
PostgreSQL (partitioned tables, trigger-kept rollups) and on a real TimescaleDB server
(hypertable, continuous aggregates), through the ``backend`` fixture every database
fixture builds on. The run's summary counts the storage tests passed on each.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_dev.certs import TlsFiles, ensure_local_ca
from fleetline_dev.embedded import EmbeddedError, LocalMosquitto, LocalPostgres, ensure_timescaledb
from tests.support import (
    SUMMARY_PROPERTY,
    ApiProcess,
    IngestProcess,
    RulesProcess,
    ServiceProcess,
)

LOCAL_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ARTIFACTS = Path(os.environ.get("FLEETLINE_TEST_ARTIFACTS", "test-artifacts"))
# pytest-xdist's workers (gw0, gw1, ...): each keeps its servers' logs in a folder of its
# own (their names repeat) and picks free ports in a range of its own, below the
# kernel's ephemeral ports, so that two workers never pick the same port at once.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER.startswith("gw"):
    ARTIFACTS = ARTIFACTS / WORKER
    _span = 22000 // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    _low = 10000 + int(WORKER[2:]) * _span
    os.environ["FLEETLINE_FREE_PORTS"] = f"{_low}-{_low + _span - 1}"
# The command line of a test reads no `.fleetline/env` of a `fleetline up` running in
# the checkout (fleetline_cli/localenv.py): tests name their own deployments.
os.environ["FLEETLINE_ENV_FILE"] = ""
# The storage backends a ``storage`` test runs on; None is plain PostgreSQL, the value an
# unmarked test's ``backend`` also has, so both share one session database.
BACKENDS: tuple[str | None, ...] = (None, "timescaledb")
BACKEND_IDS = ("postgres", "timescaledb")


@dataclass(frozen=True)
class Backend:
    """Where a test's databases live and how they are migrated."""

    name: str  # "postgres" | "timescaledb"
    admin_url: str
    storage: StorageSettings

    @property
    def timescale(self) -> bool:
        return self.name == "timescaledb"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A ``storage`` test that reaches a database runs once per backend."""
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("storage"):
        metafunc.parametrize("backend", BACKENDS, ids=BACKEND_IDS, indirect=True,
                             scope="session")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    sections: dict[str, list[str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == SUMMARY_PROPERTY:
                    section, line = value
                    sections.setdefault(section, []).append(line)
    for section, lines in sections.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.write_line(line)
    counts: Counter[str] = Counter()
    for report in terminalreporter.stats.get("passed", []):
        if "storage" in report.keywords:
            for name in BACKEND_IDS:
                if f"[{name}" in report.nodeid or f"-{name}]" in report.nodeid:
                    counts[name] += 1
    if counts:
        terminalreporter.write_line(
            f"storage tests passed: {counts['postgres']} on PostgreSQL, "
            f"{counts['timescaledb']} on TimescaleDB")


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """FLEETLINE_TEST_PG_URL, else the local server on :5432, else an embedded server."""
    configured = os.environ.get("FLEETLINE_TEST_PG_URL")
    if configured:
        yield configured
        return
    with socket.socket() as probe:
        probe.settimeout(2)
        local = probe.connect_ex(("127.0.0.1", 5432)) == 0
    if local:
        yield LOCAL_PG_URL
        return
    with LocalPostgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server.url


@pytest.fixture(scope="session")
def timescale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A real TimescaleDB: the embedded PostgreSQL with TimescaleDB built into it
    (scripts/build-timescaledb.sh, cached) and preloaded."""
    try:
        ensure_timescaledb()
    except EmbeddedError as exc:
        pytest.fail(f"TimescaleDB could not be built into the embedded PostgreSQL: {exc}. "
                    "Run the tests with `make test`.", pytrace=False)
    with LocalPostgres(tmp_path_factory.mktemp("timescaledb"), timescaledb=True) as server:
        yield server


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """Plain PostgreSQL (the server of ``admin_url``), or for the second run of a
    ``storage`` test the TimescaleDB server (``timescale_server``, started on first use)."""
    if getattr(request, "param", None) == "timescaledb":
        server: LocalPostgres = request.getfixturevalue("timescale_server")
        return Backend("timescaledb", server.url, StorageSettings(timescale="on"))
    return Backend("postgres", request.getfixturevalue("admin_url"),
                   StorageSettings(timescale="off"))


@pytest.fixture(scope="session")
async def database_url(backend: Backend) -> AsyncIterator[str]:
    try:
        admin = await asyncpg.connect(backend.admin_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {backend.admin_url} ({exc}). Run the tests with "
            "`make test`, or set FLEETLINE_TEST_PG_URL.",
            pytrace=False,
        )
    await admin.close()
    async with migrated_database(backend.admin_url, "fleetline_test", backend.storage) as url:
        yield url


@asynccontextmanager
async def migrated_database(
    admin_url: str, prefix: str, storage: StorageSettings | None = None
) -> AsyncIterator[str]:
    """A new database with every migration applied, dropped afterwards: for the session,
    or for tests whose services must serve no other test's data. Plain PostgreSQL
    partitions unless ``storage`` says otherwise."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_url, timeout=10)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(admin_url, name)
    try:
        await migrate(url, storage or StorageSettings(timescale="off"), create_database=False)
        # Tests write readings up to a few hours old directly: yesterday's partition must
        # exist too when they run shortly after midnight (migrations create today's on).
        con = await asyncpg.connect(url, timeout=10)
        try:
            await con.execute("SELECT fleetline_ensure_partition(now() - interval '1 day')")
        finally:
            await con.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a broker certificate for 127.0.0.1, as `fleetline up` makes them."""
    return ensure_local_ca(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="session")
def broker(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[LocalMosquitto]:
    """The run's anonymous broker: plain MQTT on ``port``, TLS on ``tls_port``."""
    with LocalMosquitto(tmp_path_factory.mktemp("mosquitto"), tls=tls_files) as server:
        yield server


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test: device ids and replica groups are built from it."""
    return f"{request.node.name[:24].strip('_[]')}-{secrets.token_hex(3)}".replace("[", "-")


def _starter(
    kind: type[ServiceProcess], database_url: str, broker: LocalMosquitto, artifacts: Path,
    uid: str,
) -> tuple[Callable[..., Any], list[ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(*, env: dict[str, str] | None = None, mqtt_url: str | None = None,
              database: str | None = None, name: str | None = None,
              wait_ready: bool = True) -> ServiceProcess:
        proc = kind(
            database_url=database or database_url, mqtt_url=mqtt_url or broker.url,
            log_dir=artifacts, name=name or uid, env=env,
        )
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    return start, started


@pytest.fixture
def start_ingest(
    database_url: str, broker: LocalMosquitto, artifacts: Path, uid: str
) -> Iterator[Callable[..., IngestProcess]]:
    """Start ingest processes (stopped after the test)."""
    start, started = _starter(IngestProcess, database_url, broker, artifacts, uid)
    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def start_rules(
    database_url: str, broker: LocalMosquitto, artifacts: Path, uid: str
) -> Iterator[Callable[..., RulesProcess]]:
    """Start rules processes (stopped after the test)."""
    start, started = _starter(RulesProcess, database_url, broker, artifacts, uid)
    yield start
    for proc in started:
        proc.stop()


async def count_rows(pool: asyncpg.Pool[Any], device_prefix: str) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM readings WHERE device_id LIKE $1 || '%'", device_prefix
    ))


async def wait_rows(pool: asyncpg.Pool[Any], device_prefix: str, expected: int,
                    timeout: float = 30.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        n = await count_rows(pool, device_prefix)
        if n >= expected or loop.time() > deadline:
            return n
        await asyncio.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def _require_tools() -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: run `make test` (it installs it)", pytrace=False)


@pytest.fixture(scope="session")
def api(
    database_url: str, broker: LocalMosquitto, artifacts: Path
) -> Iterator[ApiProcess]:
    proc = ApiProcess(database_url=database_url, mqtt_url=broker.url, log_dir=artifacts,
                      name=f"session-{os.getpid()}")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
async def make_key(db: asyncpg.Pool[Any]) -> Callable[..., Any]:
    """Create an API key with the given scopes, as `fleetline apikey create` does."""
    from fleetline import apikeys

    async def make(*scopes: str) -> str:
        async with db.acquire() as con:
            return (await apikeys.create_key(con, name="test", scopes=list(scopes))).token

    return make
