"""Message routes over REST: CRUD, validation, masked secrets, scopes, the notification
the rules service reloads on, and the delivery log. The routing itself (a rules process
forwarding what devices publish) is tests/e2e/test_routes_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from fleetline.rules_engine import ROUTES_CHANNEL
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess, full_notify_queue

pytestmark = [pytest.mark.integration, pytest.mark.storage]


def webhook_route(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "query": "tags.site = 'A' AND reported.fw < '1.2'",
        "metric": "temp",
        "condition": {"op": ">", "value": 30},
        "destination": {
            "type": "webhook",
            "url": "https://example.org/hook",
            "secret": "route-s3cret",
        },
        **extra,
    }


async def stored_destination(db: asyncpg.Pool[Any], route_id: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        await db.fetchval("SELECT destination FROM message_routes WHERE id = $1", route_id)
    )
    return doc


async def test_routes_crud_with_a_masked_secret_and_scopes(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    writer = client(api, await make_key("rules:write"))
    body = webhook_route(f"{uid} hot site A")
    created = writer.post("/v1/routes", json=body)
    assert created.status_code == 201, created.text
    route = created.json()
    assert route["name"] == body["name"] and route["enabled"] is True
    assert route["query"] == body["query"] and route["metric"] == "temp"
    assert route["condition"] == {"op": ">", "value": 30.0}
    assert route["destination"] == {
        "type": "webhook",
        "url": "https://example.org/hook",
        "secret": "********",
    }
    assert route["version"] == 1 and "route-s3cret" not in created.text
    assert (await stored_destination(db, route["id"]))["secret"] == "route-s3cret"

    # Readers (rules:write or telemetry:read) see it masked; others are refused.
    reader = client(api, await make_key("telemetry:read"))
    got = reader.get(f"/v1/routes/{route['id']}")
    assert got.status_code == 200 and got.json() == route
    listed = reader.get("/v1/routes", params={"limit": 1000}).json()["items"]
    assert route in listed and "route-s3cret" not in json.dumps(listed)
    assert_problem(reader.post("/v1/routes", json=body), 403, "rules:write")
    assert_problem(reader.delete(f"/v1/routes/{route['id']}"), 403, "rules:write")
    assert_problem(client(api, await make_key("devices:read")).get("/v1/routes"), 403)
    assert_problem(client(api).get("/v1/routes"), 401)

    # PUT with the mask keeps the stored secret; a new value replaces it; the other
    # destination kind replaces the whole destination.
    put = writer.put(
        f"/v1/routes/{route['id']}",
        json={**body, "condition": {"op": "outside", "low": 2, "high": 8}},
    )
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 2 and put.json()["condition"]["op"] == "outside"
    assert put.json()["destination"]["secret"] == "********"
    masked = {**body, "destination": {**body["destination"], "secret": "********"}}
    assert writer.put(f"/v1/routes/{route['id']}", json=masked).status_code == 200
    assert (await stored_destination(db, route["id"]))["secret"] == "route-s3cret"
    renewed = {**body, "destination": {**body["destination"], "secret": "n3w"}}
    assert writer.put(f"/v1/routes/{route['id']}", json=renewed).status_code == 200
    assert (await stored_destination(db, route["id"]))["secret"] == "n3w"
    to_mqtt = {
        "name": f"{uid} all of it",
        "enabled": False,
        "destination": {"type": "mqtt", "topic": f"fleet/{uid}/readings"},
    }
    moved = writer.put(f"/v1/routes/{route['id']}", json=to_mqtt)
    assert moved.status_code == 200, moved.text
    assert moved.json()["destination"] == to_mqtt["destination"]
    assert moved.json()["query"] == "" and moved.json()["metric"] is None
    assert moved.json()["enabled"] is False and moved.json()["version"] == 5
    # Nothing stored to keep: a masked secret is refused.
    assert_problem(writer.put(f"/v1/routes/{route['id']}", json=masked), 400, "masked")
    assert_problem(writer.post("/v1/routes", json=masked), 400, "masked")

    assert writer.delete(f"/v1/routes/{route['id']}").status_code == 204
    assert_problem(writer.get(f"/v1/routes/{route['id']}"), 404)
    assert_problem(writer.put(f"/v1/routes/{route['id']}", json=body), 404)
    assert_problem(writer.delete(f"/v1/routes/{route['id']}"), 404)
    assert_problem(writer.get(f"/v1/routes/{route['id']}/deliveries"), 404)


async def test_invalid_routes_get_4xx_problems_saying_why(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    writer = client(api, await make_key("rules:write"))
    body = webhook_route(f"{uid} bad")

    # A query that does not compile: 400 with the position of the offending text.
    bad_query = writer.post("/v1/routes", json={**body, "query": "tags.site = 'A' AND"})
    problem = assert_problem(bad_query, 400, "query: expected a property")
    assert problem["position"] == len("tags.site = 'A' AND")
    problem = assert_problem(
        writer.post("/v1/routes", json={**body, "query": "tags.site == 'A'"}), 400, "query"
    )
    assert problem["position"] == 11
    problem = assert_problem(
        writer.post("/v1/routes", json={**body, "query": "colour = 'red'"}), 400, "unknown"
    )
    assert problem["position"] == 0

    mqtt = {"type": "mqtt", "topic": "fleet/out"}
    for topic, why in (
        ("fleet/+/out", "wildcards"),
        ("fleet/#", "wildcards"),
        ("devices/d1/telemetry", "devices' own"),
        ("devices", "devices' own"),
        ("$SYS/x", "may not start with $"),
        ("fleet/\x85/out", "U+0085"),  # the broker would end rules' connection over it
    ):
        resp = writer.post("/v1/routes", json={**body, "destination": {**mqtt, "topic": topic}})
        assert_problem(resp, 400, why)
    assert_problem(
        writer.post("/v1/routes", json={**body, "metric": None}), 400, "a condition needs a metric"
    )
    assert_problem(
        writer.post(
            "/v1/routes", json={**body, "condition": {"op": "outside", "low": 5, "high": 1}}
        ),
        400,
        "low <= high",
    )
    for bad in (
        {**body, "destination": {**body["destination"], "url": "ftp://example.org/x"}},
        {**body, "destination": {**body["destination"], "url": "example.org/x"}},
        {**body, "destination": {"type": "email", "to": "a@example.org"}},
        {**body, "destination": {"type": "mqtt"}},
        {**body, "destination": {"type": "mqtt", "topic": ""}},
        {**body, "condition": {"op": "rate>", "value": 1}},
        {**body, "condition": {"op": ">", "value": "30"}},
        {**body, "condition": {"op": ">", "value": 1, "for_s": 5}},
        {**body, "metric": "bad metric"},
        {**body, "query": "x" * 5000},
        {**body, "name": ""},
        {**body, "surprise": True},
        {key: value for key, value in body.items() if key != "destination"},
    ):
        assert_problem(writer.post("/v1/routes", json=bad), 422)
    listed = writer.get("/v1/routes", params={"limit": 1000}).json()["items"]
    assert not [r for r in listed if r["name"].startswith(uid)]


async def test_every_change_notifies_the_rules_service_in_its_transaction(
    api: ApiProcess, make_key: Callable[..., Any], database_url: str, uid: str
) -> None:
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(
        ROUTES_CHANNEL, lambda _c, _p, _ch, payload: heard.put_nowait(json.loads(payload))
    )
    try:
        writer = client(api, await make_key("rules:write"))
        route = writer.post("/v1/routes", json=webhook_route(f"{uid} n")).json()
        assert await asyncio.wait_for(heard.get(), 10) == {"route_id": route["id"]}
        writer.put(f"/v1/routes/{route['id']}", json=webhook_route(f"{uid} n2"))
        assert await asyncio.wait_for(heard.get(), 10) == {"route_id": route["id"]}
        # A refused change notifies nothing.
        bad = webhook_route(f"{uid} n3", query="nope nope")
        assert_problem(writer.put(f"/v1/routes/{route['id']}", json=bad), 400)
        writer.delete(f"/v1/routes/{route['id']}")
        assert await asyncio.wait_for(heard.get(), 10) == {"route_id": route["id"]}
        assert heard.empty()
    finally:
        await listener.close()


async def test_the_delivery_log_lists_a_routes_deliveries_newest_first(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    writer = client(api, await make_key("rules:write"))
    route = writer.post("/v1/routes", json=webhook_route(f"{uid} log")).json()
    other = writer.post("/v1/routes", json=webhook_route(f"{uid} other")).json()
    ts = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    # The rules service writes these; here they are seeded as it would.
    for i, (route_id, status) in enumerate(
        [
            (route["id"], "delivered"),
            (other["id"], "pending"),
            (route["id"], "failed"),
            (route["id"], "pending"),
        ]
    ):
        await db.execute(
            "INSERT INTO route_deliveries (route_id, device_id, ts, reading_key, metrics, "
            "status, attempts, last_error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            route_id,
            f"{uid}-d",
            ts,
            f"{uid}-{i}".encode(),
            json.dumps({"temp": 31 + i}),
            status,
            3 if status == "failed" else 1,
            "HTTP 500" if status == "failed" else None,
        )
    reader = client(api, await make_key("telemetry:read"))
    page = reader.get(f"/v1/routes/{route['id']}/deliveries").json()
    assert [d["status"] for d in page["items"]] == ["pending", "failed", "delivered"]
    assert page["next_cursor"] is None
    failed = page["items"][1]
    assert failed["attempts"] == 3 and failed["last_error"] == "HTTP 500"
    assert failed["values"] == {"temp": 33} and failed["device_id"] == f"{uid}-d"
    assert datetime.fromisoformat(failed["ts"]) == ts
    first = reader.get(f"/v1/routes/{route['id']}/deliveries", params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["next_cursor"] == str(first["items"][1]["id"])
    rest = reader.get(
        f"/v1/routes/{route['id']}/deliveries", params={"limit": 2, "cursor": first["next_cursor"]}
    ).json()
    assert [d["status"] for d in rest["items"]] == ["delivered"]
    only = reader.get(f"/v1/routes/{route['id']}/deliveries", params={"status": "failed"})
    assert [d["status"] for d in only.json()["items"]] == ["failed"]
    assert_problem(
        reader.get(f"/v1/routes/{route['id']}/deliveries", params={"status": "lost"}), 422
    )

    # Deleting a route drops what still waits; finished deliveries age out of the log.
    writer.delete(f"/v1/routes/{route['id']}")
    left = await db.fetch(
        "SELECT status FROM route_deliveries WHERE route_id = $1 ORDER BY id", route["id"]
    )
    assert [r["status"] for r in left] == ["delivered", "failed"]
    writer.delete(f"/v1/routes/{other['id']}")


async def test_a_full_notify_queue_does_not_fail_a_route_change(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], database_url: str,
    uid: str,
) -> None:
    """PostgreSQL fails a COMMIT that notifies while its NOTIFY queue is full (54000): the
    change is stored without the notification (the rules service's refresh takes it),
    never a 500."""
    # As a full queue does: fail the commit of our routes' writes unless they go quiet.
    undo = await full_notify_queue(
        db, uid, "message_routes", f"coalesce(NEW.name, OLD.name) LIKE '{uid}%'",
        on="INSERT OR UPDATE OR DELETE",
    )
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(ROUTES_CHANNEL, lambda *args: heard.append(args[-1]))
    try:
        writer = client(api, await make_key("rules:write"))
        created = writer.post("/v1/routes", json=webhook_route(f"{uid} full"))
        assert created.status_code == 201, created.text
        route = created.json()
        assert writer.get(f"/v1/routes/{route['id']}").json() == route
        put = writer.put(f"/v1/routes/{route['id']}", json=webhook_route(f"{uid} full 2"))
        assert put.status_code == 200, put.text
        assert put.json()["name"] == f"{uid} full 2" and put.json()["version"] == 2
        assert_problem(
            writer.put("/v1/routes/999999999", json=webhook_route(f"{uid} none")), 404
        )
        assert writer.delete(f"/v1/routes/{route['id']}").status_code == 204
        assert_problem(writer.get(f"/v1/routes/{route['id']}"), 404)
        await asyncio.sleep(0.3)
        assert not [h for h in heard if f'"route_id":{route["id"]}' in h.replace(" ", "")]
        assert "NOTIFY queue is full" in api.log_tail(200)
    finally:
        await listener.close()
        await undo()


async def test_a_topic_the_broker_refuses_fails_the_delivery_for_good() -> None:
    """A stored route whose topic the broker refuses (a row from an older release) must
    not make rules publish it: Mosquitto would end rules' whole connection at every retry."""
    from fleetline_rules.actions import Sender
    from fleetline_rules.settings import RulesSettings

    sender = Sender(RulesSettings(), lambda: None)
    outcome = await sender.publish("fleet/\x85/out", b"{}")
    assert not outcome.ok and not outcome.retry
    assert outcome.error is not None and "U+0085" in outcome.error
