"""API keys: how they look, how they are made and checked, and what they may do.

Shared by the api service (checking; ``/v1/apikeys`` creates, lists and revokes) and the
command line (creating the first admin key with database access). A key reads
``flk_<id>_<secret>``; the database keeps ``sha256(secret)`` only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass
from typing import Literal, get_args

import asyncpg

from fleetline import db

Scope = Literal[
    "devices:read",
    "devices:write",
    "telemetry:read",
    "commands:write",
    "rules:write",
    "firmware:write",
    "admin",
]
SCOPES: tuple[str, ...] = get_args(Scope)
PREFIX = "flk_"
_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class NewKey:
    id: str
    token: str  # shown once


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    scopes: tuple[str, ...]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def same_secret(given: str, expected: str) -> bool:
    """Whether ``given`` is ``expected``, in constant time (both hashed first: not even
    the length of ``expected`` shows)."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token; None otherwise."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id, secret


async def create_key(con: db.Connection, *, name: str, scopes: list[str]) -> NewKey:
    if not 1 <= len(name) <= 200:
        raise ValueError("the name must have 1 to 200 characters")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {unknown or 'none'}")
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    await con.execute(
        "INSERT INTO api_keys (id, name, secret_sha256, scopes) VALUES ($1, $2, $3, $4)",
        key_id,
        name,
        _digest(secret),
        sorted(set(scopes)),
    )
    return NewKey(id=key_id, token=f"{PREFIX}{key_id}_{secret}")


_COLUMNS = "id, name, scopes, created_at, last_used_at, revoked_at"
# Taken by the creation of a first key (create_first_key): two such requests take turns.
_BOOTSTRAP_LOCK = "SELECT pg_advisory_xact_lock(hashtext('fleetline.apikeys.bootstrap'))"


async def get_key(con: db.Connection, key_id: str) -> asyncpg.Record | None:
    """The key's row without its secret (revoked keys too)."""
    return await con.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1", key_id)


async def admin_exists(con: db.Connection) -> bool:
    """Whether some key that is not revoked holds the ``admin`` scope."""
    return bool(
        await con.fetchval(
            "SELECT EXISTS (SELECT 1 FROM api_keys "
            "WHERE revoked_at IS NULL AND 'admin' = ANY(scopes))"
        )
    )


async def create_first_key(con: db.Connection, *, name: str) -> NewKey | None:
    """The first admin key, made without one (the API's bootstrap token), only while no
    active admin key exists: None once one does. Only an admin key: a way in that made
    other keys would stay open for as long as none was made. Concurrent calls take turns
    (an advisory lock held by the transaction), so two of them cannot both see "none
    yet"."""
    async with con.transaction():
        await con.execute(_BOOTSTRAP_LOCK)
        if await admin_exists(con):
            return None
        return await create_key(con, name=name, scopes=["admin"])


async def revoke_keeping_an_admin(con: db.Connection, key_id: str) -> bool | None:
    """Revoke ``key_id`` unless it is the last active admin key (None then: no one could
    make or revoke keys any more); False if there is no such active key. Under the
    bootstrap lock: two admins revoking each other at once leave one of them."""
    async with con.transaction():
        await con.execute(_BOOTSTRAP_LOCK)
        row = await con.fetchrow(
            "SELECT 'admin' = ANY(scopes) AS admin FROM api_keys "
            "WHERE id = $1 AND revoked_at IS NULL",
            key_id,
        )
        if row is None:
            return False
        if row["admin"]:
            others = await con.fetchval(
                "SELECT count(*) FROM api_keys WHERE revoked_at IS NULL "
                "AND 'admin' = ANY(scopes) AND id <> $1",
                key_id,
            )
            if not others:
                return None
        return await revoke(con, key_id)


async def verify(con: db.Connection, token: str) -> KeyInfo | None:
    """The key's identity and scopes, or None for an unknown, revoked or wrong token."""
    parts = split_token(token)
    if parts is None:
        return None
    key_id, secret = parts
    digest = _digest(secret)  # before the lookup: unknown ids cost the same
    row = await con.fetchrow(
        "SELECT name, secret_sha256, scopes, "
        "       last_used_at IS NULL OR last_used_at < now() - interval '1 minute' AS stale "
        "FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
        key_id,
    )
    if row is None or not hmac.compare_digest(bytes(row["secret_sha256"]), digest):
        return None
    if row["stale"]:  # at most one write a minute per key, not one per request
        await con.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key_id)
    return KeyInfo(id=key_id, name=row["name"], scopes=tuple(row["scopes"]))


async def revoke(con: db.Connection, key_id: str) -> bool:
    status = await con.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return bool(status.endswith(" 1"))


async def list_keys(con: db.Connection) -> list[asyncpg.Record]:
    return list(await con.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id"))
