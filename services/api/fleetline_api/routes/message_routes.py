"""Message routes: CRUD, and each route's recent deliveries.

The rules service does the routing (it already reads every reading from the broker and
acknowledges one only after what it caused is committed): every write here notifies
``fleetline_routes`` in its transaction, so it reloads its routes as soon as the change
is committed. When PostgreSQL's NOTIFY queue is full (a LISTEN session stopped reading;
the COMMIT fails), the change is written again without the notification, and the rules
service's periodic refresh picks it up. A query that does not compile is a 400 whose
``position`` points at the offending text.

Scopes as for rules: writing needs ``rules:write``; reading needs ``rules:write`` or
``telemetry:read`` (a route is a view on telemetry; its secret is masked in every
response).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Response

from fleetline import db, devicequery, mqtt, rules_engine
from fleetline_api.deps import PoolDep, RulesRead, RulesWrite
from fleetline_api.openapi import links
from fleetline_api.problems import CONFLICT, NOT_FOUND, RESPONSES
from fleetline_api.queries import message_routes as sql
from fleetline_api.schemas.message_routes import (
    DeliveryState,
    MqttDestination,
    RouteDelivery,
    RouteDeliveryPage,
    RouteIn,
    RouteOutside,
    RoutePage,
    RoutePublic,
    WebhookDestination,
)
from fleetline_api.schemas.rules import MASK

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/routes", tags=["routes"], responses=RESPONSES)

RouteId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# The rules service evaluates every route's query over the registry at each refresh:
# a bound on that work.
MAX_ROUTES = 1000
# The devices' own topics; a route must not publish as if it were a device.
DEVICE_NAMESPACE = "devices"


def public(row: Any) -> RoutePublic:
    destination = dict(row["destination"])
    if destination.get("secret"):
        destination["secret"] = MASK
    return RoutePublic(
        id=row["id"],
        name=row["name"],
        enabled=row["enabled"],
        source=row["source"],
        query=row["query"],
        metric=row["metric"],
        condition=row["condition"],
        destination=destination,
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def check_topic(topic: str) -> None:
    """A destination topic is a topic name outside the devices' namespace (400 if not)."""
    if "+" in topic or "#" in topic:
        raise HTTPException(
            400, "destination.topic must be a topic name: the wildcards + and # are not allowed"
        )
    problem = mqtt.topic_name_problem(topic)
    if problem:
        raise HTTPException(400, f"destination.topic {problem}")
    if topic.startswith("$"):
        raise HTTPException(400, "destination.topic may not start with $ (the broker's own)")
    if topic == DEVICE_NAMESPACE or topic.startswith(f"{DEVICE_NAMESPACE}/"):
        raise HTTPException(
            400,
            "destination.topic may not be under devices/: that namespace is the devices' "
            "own (a route publishes readings onward, not as a device)",
        )


def _columns(body: RouteIn, stored: dict[str, Any] | None) -> list[Any]:
    """The route's column values (name .. destination); a masked secret takes the stored
    one."""
    try:
        devicequery.compile_query(body.query)
    except devicequery.QueryError as exc:
        raise devicequery.QueryError(f"query: {exc.message}", exc.position) from None
    if body.condition is not None and body.metric is None:
        raise HTTPException(400, "a condition needs a metric: name it in 'metric'")
    if body.source == "files" and body.metric is not None:
        raise HTTPException(400, "a route of files forwards each file whole: no metric")
    if isinstance(body.condition, RouteOutside) and body.condition.low > body.condition.high:
        raise HTTPException(400, "'outside' needs low <= high")
    destination = body.destination.model_dump(mode="json", exclude_none=True)
    if isinstance(body.destination, MqttDestination):
        check_topic(body.destination.topic)
    elif isinstance(body.destination, WebhookDestination) and destination.get("secret") == MASK:
        old = stored or {}
        if old.get("type") != "webhook" or not old.get("secret"):
            raise HTTPException(400, "destination.secret is masked but no secret is stored")
        destination["secret"] = old["secret"]
    condition = body.condition.model_dump(mode="json") if body.condition is not None else None
    return [body.name, body.enabled, body.query, body.metric, condition, destination, body.source]


async def _change(pool: asyncpg.Pool[Any], write: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``write`` (returning a row with the route's ``id``) in a transaction that
    notifies the rules service (which also refreshes its routes periodically)."""

    async def work(con: db.Connection, notices: db.Notices) -> Any:
        row = await write(con)
        notices.add(rules_engine.ROUTES_CHANNEL, orjson.dumps({"route_id": row["id"]}).decode())
        return row

    return await db.notifying(pool, work, what="route change")


@router.get("", summary="List message routes", response_model=RoutePage)
async def list_routes(
    pool: PoolDep,
    _key: RulesRead,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> RoutePage:
    """Message routes by id (secrets masked)."""
    rows = await pool.fetch(sql.LIST_ROUTES, cursor, limit + 1)
    items = [public(r) for r in rows[:limit]]
    return RoutePage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


@router.post(
    "",
    summary="Create a message route",
    status_code=201,
    response_model=RoutePublic,
    responses={
        **CONFLICT,
        201: {
            "description": "The route (secret masked)",
            "links": links(
                "/id",
                "GetRoute:routes-get_route:route_id",
                "ReplaceRoute:routes-replace_route:route_id",
                "DeleteRoute:routes-delete_route:route_id",
                "RouteDeliveries:routes-route_deliveries:route_id",
            ),
        },
    },
)
async def create_route(body: RouteIn, pool: PoolDep, _key: RulesWrite) -> RoutePublic:
    """Create a route; the rules service routes readings through it from its next
    reload on (at once, on the change's notification). 409 beyond 1000 routes."""
    values = _columns(body, None)

    async def write(con: db.Connection) -> Any:
        # Serialises creations, so the count below holds.
        await con.execute(sql.LOCK_ROUTES)
        if await con.fetchval(sql.COUNT_ROUTES) >= MAX_ROUTES:
            raise HTTPException(409, f"there are {MAX_ROUTES} routes already: delete one first")
        return await con.fetchrow(sql.INSERT_ROUTE, *values)

    return public(await _change(pool, write))


@router.get(
    "/{route_id}", summary="Get a message route", response_model=RoutePublic, responses=NOT_FOUND
)
async def get_route(route_id: RouteId, pool: PoolDep, _key: RulesRead) -> RoutePublic:
    """One route (secret masked)."""
    row = await pool.fetchrow(sql.SELECT_ROUTE, route_id)
    if row is None:
        raise HTTPException(404, f"route {route_id} not found")
    return public(row)


@router.put(
    "/{route_id}",
    summary="Replace a message route",
    response_model=RoutePublic,
    responses=NOT_FOUND,
)
async def replace_route(
    route_id: RouteId, body: RouteIn, pool: PoolDep, _key: RulesWrite
) -> RoutePublic:
    """Replace a route. A secret sent back as ``********`` keeps the stored one.
    Deliveries already queued go to the route's destination as it is when they are
    sent, also when the route is disabled."""

    async def write(con: db.Connection) -> Any:
        stored = await con.fetchval(sql.LOCK_DESTINATION, route_id)
        if stored is None:
            raise HTTPException(404, f"route {route_id} not found")
        return await con.fetchrow(sql.UPDATE_ROUTE, route_id, *_columns(body, stored))

    return public(await _change(pool, write))


@router.delete(
    "/{route_id}", summary="Delete a message route", status_code=204, responses=NOT_FOUND
)
async def delete_route(route_id: RouteId, pool: PoolDep, _key: RulesWrite) -> Response:
    """Delete a route; its deliveries still waiting are dropped (the finished ones age
    out of the log)."""

    async def write(con: db.Connection) -> Any:
        row = await con.fetchrow(sql.DELETE_ROUTE, route_id)
        if row is None:
            raise HTTPException(404, f"route {route_id} not found")
        await con.execute(sql.DROP_PENDING, route_id)
        return row

    await _change(pool, write)
    return Response(status_code=204)


@router.get(
    "/{route_id}/deliveries",
    summary="A message route's deliveries",
    response_model=RouteDeliveryPage,
    responses=NOT_FOUND,
)
async def route_deliveries(
    route_id: RouteId,
    pool: PoolDep,
    _key: RulesRead,
    status: Annotated[DeliveryState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> RouteDeliveryPage:
    """The route's recent deliveries, newest first, with their state, attempts and last
    error (kept for the rules service's ``FLEETLINE_RULES_ROUTE_LOG_RETENTION_SECONDS``)."""
    async with pool.acquire() as con:
        if await con.fetchval(sql.ROUTE_EXISTS, route_id) is None:
            raise HTTPException(404, f"route {route_id} not found")
        rows = await con.fetch(sql.DELIVERIES, route_id, status, cursor, limit + 1)
    items = [RouteDelivery(**dict(r)) for r in rows[:limit]]
    return RouteDeliveryPage(
        items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None
    )
