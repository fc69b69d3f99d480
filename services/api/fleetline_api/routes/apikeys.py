"""``/v1/apikeys``: API keys over REST, made, listed and revoked with an admin key.

A key reads ``flk_<id>_<secret>``; the database keeps only the secret's SHA-256
(fleetline/apikeys.py), so a key's token is shown once, in the answer that creates it, and
never listed. Only keys holding the ``admin`` scope may use these routes.

**The first key** needs no database shell: with ``FLEETLINE_API_BOOTSTRAP_TOKEN`` set (a
random string of at least 32 characters, from a Kubernetes Secret), ``POST /v1/apikeys``
also accepts that token as its bearer credential, and only while no active (unrevoked)
admin key exists, and it makes an admin key only (other scopes are then made with that
key). The operator makes the first admin key with it, then removes the setting; should
it stay, it still makes no key once an admin key exists, and works again only if every
admin key was revoked (a way back in, as the database shell would be; REST never revokes
the last active admin key). Its check, the creation and the "no admin key yet" test are
one transaction under an advisory lock, so two requests racing with the token cannot
both make an admin key. The token is compared in constant time (both sides hashed
first, so not even its length leaks), is never logged, and is accepted by no other
route. Wrong tokens are counted per client address against the rate limit per key
(``FLEETLINE_API_RATE_PER_KEY``): a client guessing gets 429, and no one else is locked
out by it; the request size limits apply before any of this, as on every route.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from fleetline import apikeys
from fleetline.apikeys import KeyInfo
from fleetline_api.deps import Admin, Bearer, PoolDep, SettingsDep, actor, authorize, take_rate
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.ratelimit import KeyRateLimiter
from fleetline_api.schemas.apikeys import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyPublic,
    KeyId,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/apikeys", tags=["apikeys"], responses=RESPONSES)

# The rate limit's buckets of wrong bootstrap tokens: "bootstrap <client address>" (no
# key id has a space).
BOOTSTRAP_BUCKET = "bootstrap"


async def _creator(
    request: Request, pool: PoolDep, settings: SettingsDep, credentials: Bearer
) -> KeyInfo | None:
    """Who may create a key: an admin key (KeyInfo), or the bootstrap token (None; its
    condition, no active admin key, is checked where the key is made)."""
    token = credentials.credentials if credentials else None
    bootstrap = settings.bootstrap_token
    if token is not None and bootstrap is not None and not token.startswith(apikeys.PREFIX):
        bucket = f"{BOOTSTRAP_BUCKET} {request.client.host if request.client else ''}"
        limiter: KeyRateLimiter = request.state.rate_limits
        if limiter.wait(bucket) is None and apikeys.same_secret(
            token, bootstrap.get_secret_value()
        ):
            return None
        # A wrong token counts (429 once this client has made too many), and is then
        # answered as any other unknown credential: nothing says a bootstrap token exists.
        take_rate(request, bucket)
    key = await authorize(pool, token, "admin")
    take_rate(request, key.id)
    return key


Creator = Annotated[KeyInfo | None, Depends(_creator)]


def _public(row: asyncpg.Record) -> ApiKeyPublic:
    doc = dict(row)
    return ApiKeyPublic(**doc, state="revoked" if doc["revoked_at"] else "active")


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Create an API key (its token shown once)",
    responses={
        201: {
            "description": "The key, with its token: store it now, it is not shown again",
        },
        403: {
            "model": Problem,
            "description": "The key is not an admin key, or the bootstrap token was given "
            "while an active admin key exists",
        },
    },
)
async def create_api_key(body: ApiKeyCreate, pool: PoolDep, creator: Creator) -> ApiKeyCreated:
    """Make a key with the scopes asked for (``admin`` may do everything). The answer
    carries its token, ``flk_<id>_<secret>``, this once: only the secret's SHA-256 is
    kept.

    Authorized by an admin key, or, to make the **first** key without database access, by
    the API's bootstrap token (``FLEETLINE_API_BOOTSTRAP_TOKEN``, at least 32 characters)
    as the bearer credential: accepted here only, and only while no active admin key
    exists (403 afterwards; checked and created in one locked transaction, so racing
    requests cannot both succeed). Make an admin key with it, then remove the setting
    (deploy/k8s/README.md, "The first API key")."""
    scopes: list[str] = sorted(set(body.scopes))
    async with pool.acquire() as con:
        if creator is None:
            if scopes != ["admin"]:
                raise HTTPException(
                    403,
                    'the bootstrap token makes only the first admin key: ask for scopes ["admin"], '
                    "then make other keys with that key",
                )
            new = await apikeys.create_first_key(con, name=body.name)
            if new is None:
                raise HTTPException(
                    403,
                    "the bootstrap token makes keys only while no active admin key exists; "
                    "use an admin key (and remove FLEETLINE_API_BOOTSTRAP_TOKEN)",
                )
            made_by = "the bootstrap token"
        else:
            new = await apikeys.create_key(con, name=body.name, scopes=scopes)
            made_by = actor(creator)
        row = await apikeys.get_key(con, new.id)
    assert row is not None  # made just now
    log.info("API key %s (%s) created by %s", new.id, ",".join(scopes), made_by)
    return ApiKeyCreated(**_public(row).model_dump(), token=new.token)


@router.get("", response_model=ApiKeyList, summary="List API keys (never their tokens)")
async def list_api_keys(
    pool: PoolDep,
    _key: Admin,
    state: Annotated[
        Literal["active", "revoked"] | None, Query(description="Only keys in this state")
    ] = None,
) -> ApiKeyList:
    """Every key, oldest first, with its scopes and when it was last used (to within a
    minute) or revoked; never its token or secret."""
    async with pool.acquire() as con:
        keys = [_public(r) for r in await apikeys.list_keys(con)]
    return ApiKeyList(items=[k for k in keys if state is None or k.state == state])


@router.delete(
    "/{key_id}",
    status_code=204,
    summary="Revoke an API key",
    responses={
        **NOT_FOUND,
        409: {
            "model": Problem,
            "description": "A key cannot revoke itself, nor the last active admin key",
        },
    },
)
async def revoke_api_key(key_id: KeyId, pool: PoolDep, key: Admin) -> Response:
    """Revoke the key at once: every request with it is refused from then on (401), in
    every API process. The key stays listed, ``revoked``. A key cannot revoke itself (409:
    revoke it with another admin key), nor the last active admin key (409: two admins
    revoking each other at once leave one), so no one locks the API's keys out by
    mistake."""
    if key_id == key.id:
        raise HTTPException(409, "a key cannot revoke itself; use another admin key")
    async with pool.acquire() as con:
        revoked = await apikeys.revoke_keeping_an_admin(con, key_id)
    if revoked is None:
        raise HTTPException(409, f"{key_id} is the last active admin key; make another first")
    if not revoked:
        raise HTTPException(404, f"no active API key {key_id}")
    log.info("API key %s revoked by %s", key_id, actor(key))
    return Response(status_code=204)
