"""``/v1/query``: the devices a device query matches, with their twins.

The query language is :mod:`fleetline.devicequery`; it compiles to a parameterised SQL
condition, and a query that does not compile is a 400 whose ``position`` points at the
offending text. Pages are ordered by device id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleetline import devicequery
from fleetline_api.deps import DevicesRead, PoolDep
from fleetline_api.problems import RESPONSES
from fleetline_api.queries import query as sql
from fleetline_api.schemas.query import (
    QUERY_DESCRIPTION,
    DeviceMatch,
    QueryPage,
    QueryRequest,
)

router = APIRouter(prefix="/v1/query", tags=["query"], responses=RESPONSES)


async def _run(pool: PoolDep, request: QueryRequest) -> QueryPage:
    compiled = devicequery.compile_query(request.query, first_param=3)
    rows = await pool.fetch(
        sql.select_matches(compiled.where), request.cursor, request.limit + 1, *compiled.params
    )
    items = [DeviceMatch(**dict(r)) for r in rows[: request.limit]]
    more = len(rows) > request.limit
    return QueryPage(items=items, next_cursor=items[-1].device_id if more else None)


@router.post("", summary="Query devices (body)", response_model=QueryPage)
async def query_devices(pool: PoolDep, _key: DevicesRead, body: QueryRequest) -> QueryPage:
    """The devices the query matches (a 400 problem with `position` when it does not
    compile)."""
    return await _run(pool, body)


@router.get("", summary="Query devices (URL)", response_model=QueryPage)
async def query_devices_get(
    pool: PoolDep,
    _key: DevicesRead,
    q: Annotated[
        str, Query(max_length=devicequery.MAX_QUERY_LENGTH, description=QUERY_DESCRIPTION)
    ] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> QueryPage:
    """As `POST /v1/query`, with the query in `q`."""
    return await _run(pool, QueryRequest(query=q, limit=limit, cursor=cursor))
