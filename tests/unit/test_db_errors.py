"""fleetline.db.is_transient: which database errors a writer retries."""

from __future__ import annotations

import asyncpg

from fleetline import db


def test_what_is_retried_and_what_is_not() -> None:
    retried = [
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        # A connection broken by a server crash, reset on its way back to the pool
        # (seen when PostgreSQL was killed under load).
        asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"),
    ]
    for exc in retried:
        assert db.is_transient(exc), exc
    refused = [
        asyncpg.DataError("invalid input for query argument"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.UndefinedTableError("relation does not exist"),
        ValueError("bad"),
    ]
    for exc in refused:
        assert not db.is_transient(exc), exc
