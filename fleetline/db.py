"""Database access shared by the services: pool creation and connection retry."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
import orjson

log = logging.getLogger(__name__)
T = TypeVar("T")

POOL_CLOSE_TIMEOUT_SECONDS = 10.0


async def init_connection(con: asyncpg.Connection[Any]) -> None:
    """Codecs every connection gets: jsonb/json as Python objects via orjson."""
    for typename in ("jsonb", "json"):
        await con.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # What a service's queries receive: a plain connection or one borrowed from a pool.
    Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    # What a single statement may run on: a connection, or a pool (one borrowed for it).
    Queryable: TypeAlias = Connection | asyncpg.Pool[Any]

ConnectionInit = Callable[["asyncpg.Connection[Any]"], Awaitable[None]]


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    init: ConnectionInit | None = None,
    command_timeout: float | None = None,
) -> asyncpg.Pool[Any]:
    """A pool whose connections get the shared codecs, then the service's own ``init``."""

    async def setup(con: asyncpg.Connection[Any]) -> None:
        await init_connection(con)
        if init is not None:
            await init(con)

    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=setup, command_timeout=command_timeout
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool[Any]) -> None:
    """Close gracefully, but never hang shutdown on a connection that does not come back."""
    try:
        await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning("database pool did not close in time; terminating connections")
        pool.terminate()


READY_TIMEOUT_SECONDS = 2.0


async def answers(pool: asyncpg.Pool[Any], *, timeout: float = READY_TIMEOUT_SECONDS) -> bool:
    """The database hands out a connection and answers a query, within ``timeout`` each
    (a readiness probe must not hang on a database that does not answer)."""
    try:
        async with pool.acquire(timeout=timeout) as con:
            await con.fetchval("SELECT 1", timeout=timeout)
    except Exception:
        return False
    return True


async def close_connection(con: asyncpg.Connection[Any]) -> None:
    """Close politely, but do not wait on a server that never closes its end (seen with
    servers reached through some TCP relays)."""
    try:
        await con.close(timeout=POOL_CLOSE_TIMEOUT_SECONDS)
    except (TimeoutError, OSError, asyncpg.InterfaceError):
        con.terminate()


async def wait_for_database(dsn: str, *, timeout_seconds: float = 60.0) -> None:
    """Block until the server accepts a connection; log while it does not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    attempt = 0
    while True:
        try:
            con = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            if isinstance(exc, asyncpg.InvalidCatalogNameError | asyncpg.InvalidPasswordError):
                raise
            if loop.time() > deadline:
                raise
            if attempt % 5 == 0:
                log.warning("database not reachable yet (%s); retrying", exc)
            attempt += 1
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        else:
            await close_connection(con)
            return


def _resolve(future: asyncio.Future[None], *_args: object) -> None:
    if not future.done():
        future.set_result(None)


# SQLSTATE classes of errors a retry can fix: connection (08), insufficient resources
# (53), operator intervention such as a restart (57), transaction rollback such as a
# deadlock or serialization failure (40).
TRANSIENT_CLASSES = ("08", "53", "57", "40")
# Retries of a failed write wait 0.1 s, doubling up to this.
RETRY_MAX_SECONDS = 10.0


def is_transient(exc: BaseException) -> bool:
    """A database error that trying again can fix: the connection, the server's
    resources, a restart, a deadlock. Not asyncpg's client-side DataError (a value it
    cannot encode), which is a ValueError and fails again."""
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return False
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    # asyncpg's own state error when a connection that broke mid-operation (the server
    # killed) is reset on its way back to the pool: the pool drops that connection, and
    # the next try takes a new one. Measured: a PostgreSQL kill -9 under load stopped
    # ingest with "cannot switch to state 15; another operation (2) is in progress".
    if isinstance(exc, asyncpg.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "")).startswith(TRANSIENT_CLASSES)
    return False


def retry_delay(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based) of a failed write."""
    return min(RETRY_MAX_SECONDS, 0.1 * 2.0 ** min(attempt, 10))


# How often a LISTEN connection is probed: a half-open one never terminates by itself.
LISTEN_PROBE_SECONDS = 10.0
Notified = Callable[[Any, int, str, Any], None]

# PostgreSQL raises "too many notifications in the NOTIFY queue" at COMMIT when its
# queue is full (a LISTEN session stopped reading): the whole transaction is lost.
NOTIFY_QUEUE_FULL = "54000"
# Read by triggers that NOTIFY from a writer's transaction (migration 0015's c2d trigger):
# while set, they leave it to their listeners' periodic sweep. A writer that retries a
# transaction without notifying after a full queue sets it too.
QUIET_NOTIFY_SQL = "SET LOCAL fleetline.quiet = 'on'"


def is_notify_queue_full(exc: BaseException) -> bool:
    """The error a COMMIT raises when the NOTIFY queue is full: SQLSTATE 54000 (program
    limit exceeded, which other limits share) with PostgreSQL's message for it."""
    return (
        isinstance(exc, asyncpg.PostgresError)
        and getattr(exc, "sqlstate", "") == NOTIFY_QUEUE_FULL
        and "notifications in the NOTIFY queue" in str(exc)
    )


# Every payload of one channel in one statement.
NOTIFY_MANY_SQL = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"


class Notices:
    """The notifications a transaction run by :func:`notifying` sends at its commit."""

    def __init__(self) -> None:
        self.items: list[tuple[str, list[str]]] = []

    def add(self, channel: str, *payloads: str) -> None:
        if payloads:
            self.items.append((channel, list(payloads)))


async def notifying(
    pool: asyncpg.Pool[Any], work: Callable[[Connection, Notices], Awaitable[T]], *, what: str
) -> T:
    """Run ``work(con, notices)`` in a transaction that sends what it added to
    ``notices`` at its commit.

    Notifications only tell listeners sooner what they would find by their periodic
    sweep, so they must never cost the change: when the commit fails because
    PostgreSQL's NOTIFY queue is full, the transaction is run again without them, with
    :data:`QUIET_NOTIFY_SQL` set for triggers that notify. ``what`` names the change in
    that log line."""
    async with pool.acquire() as con:
        notices = Notices()
        try:
            async with con.transaction():
                result = await work(con, notices)
                for channel, payloads in notices.items:
                    await con.execute(NOTIFY_MANY_SQL, channel, payloads)
            return result
        except asyncpg.PostgresError as exc:
            if not is_notify_queue_full(exc):
                raise
        log.error(
            "the database's NOTIFY queue is full (a LISTEN session stopped reading); "
            "%s written without notifying (listeners find it by their periodic sweep)",
            what,
        )
        async with con.transaction():
            await con.execute(QUIET_NOTIFY_SQL)
            return await work(con, Notices())


async def listen(
    dsn: str,
    channels: str | Collection[str],
    callback: Notified,
    *,
    on_listening: Callable[[], None] | None = None,
    on_lost: Callable[[], None] | None = None,
) -> None:
    """LISTEN on ``channels`` (one name or several) on a connection of its own until
    cancelled, reconnecting with backoff. ``callback`` gets every channel's
    notifications (its third argument names the channel). ``on_listening`` runs after
    each (re)subscription, ``on_lost`` when the connection goes: notifications sent in
    between are gone, and the caller decides what that means (reload, tell its
    clients)."""
    from fleetline.mqtt import backoff_seconds

    names = [channels] if isinstance(channels, str) else list(channels)
    shown = ", ".join(names)
    attempt = 0
    while True:
        con: asyncpg.Connection[Any] | None = None
        try:
            con = await asyncpg.connect(dsn, timeout=10)
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            con.add_termination_listener(functools.partial(_resolve, lost))
            for name in names:
                await con.add_listener(name, callback)
            attempt = 0
            if on_listening is not None:
                on_listening()
            while not lost.done():
                await asyncio.wait({lost}, timeout=LISTEN_PROBE_SECONDS)
                if not lost.done():
                    await con.fetchval("SELECT 1", timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("LISTEN %s lost the database: %s", shown, exc)
        finally:
            if con is not None:
                await close_connection(con)
            if on_lost is not None:
                on_lost()
        await asyncio.sleep(backoff_seconds(attempt))
        attempt += 1
