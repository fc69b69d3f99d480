"""API keys: how they look, how they are made and checked, and what they may do.

Shared by the api service (checking) and the command line (creating the first admin
key). A key reads ``flk_<id>_<secret>``; the database keeps ``sha256(secret)`` only.
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
    return list(
        await con.fetch(
            "SELECT id, name, scopes, created_at, last_used_at, revoked_at FROM api_keys "
            "ORDER BY created_at"
        )
    )
