"""``/v1/stream``: stored telemetry and status changes, live, over a WebSocket.

Authentication: ``Authorization: Bearer <key>``, or (browsers cannot set headers) the
subprotocols ``fleetline.v1`` and ``bearer.<key>``; the server answers with
``fleetline.v1``. The key needs ``telemetry:read``. The first message is
``{"type": "subscribed", ...}``: events stored from then on are sent. Close codes: 4401
no or unknown key, 4403 scope missing, 1008 bad query parameter, 1013 too slow, too many
clients, this process lagging behind, or events lost on the way (a gap in a publisher's
sequence), 1011 the stream lost its broker or database connection (reconnect).
``GET /v1/stream/asyncapi.json`` describes all of it as an AsyncAPI 3.0 document
(fleetline_api/asyncapi.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, WebSocket, WebSocketDisconnect

from fleetline_api import asyncapi
from fleetline_api.deps import authorize
from fleetline_api.params import TagFilter, parse_tags
from fleetline_api.schemas.common import DeviceId, MetricName
from fleetline_api.workers.stream import StreamFilter, StreamHub

router = APIRouter(tags=["stream"])

SUBPROTOCOL = "fleetline.v1"
BEARER_PREFIX = "bearer."
SEND_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 5.0


def _token(websocket: WebSocket) -> str | None:
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for offered in websocket.scope.get("subprotocols", []):
        if offered.startswith(BEARER_PREFIX):
            return str(offered[len(BEARER_PREFIX) :])
    return None


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code, reason), CLOSE_TIMEOUT_SECONDS)


@router.websocket("/v1/stream")
async def stream(
    websocket: WebSocket,
    device: Annotated[list[DeviceId], Query(max_length=1000)] = [],  # noqa: B006
    tag: TagFilter = [],  # noqa: B006
    metric: Annotated[list[MetricName], Query(max_length=256)] = [],  # noqa: B006
    events: Annotated[
        str, Query(pattern=r"^(telemetry|status|alarm|file)(,(telemetry|status|alarm|file))*$")
    ] = "telemetry,status,alarm,file",
) -> None:
    state: Any = websocket.state
    hub: StreamHub = state.stream
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    try:
        await authorize(state.pool, _token(websocket), "telemetry:read")
    except HTTPException as exc:
        await _close(websocket, 4000 + exc.status_code, str(exc.detail))
        return
    tags = parse_tags(tag)
    if tags is None:
        await _close(websocket, 1008, "tag: one tag cannot have two values")
        return
    if not hub.listening:
        await _close(websocket, 1013, "the stream is not connected to its sources; retry")
        return
    if hub.clients >= state.settings.stream_max_clients:
        await _close(websocket, 1013, "too many stream clients; retry later")
        return
    wanted = StreamFilter(
        devices=frozenset(device),
        tags=tags,
        metrics=frozenset(metric),
        types=frozenset(events.split(",")),
    )
    with hub.subscribe(wanted, queue_size=state.settings.stream_queue_size) as sub:

        async def pump() -> None:
            await hub.announced()
            await websocket.send_json(
                {
                    "type": "subscribed",
                    "devices": sorted(wanted.devices),
                    "tags": wanted.tags,
                    "metrics": sorted(wanted.metrics),
                    "events": sorted(wanted.types),
                }
            )
            async for encoded in sub.events():
                await asyncio.wait_for(websocket.send_text(encoded.decode()), SEND_TIMEOUT_SECONDS)

        async def drain_input() -> None:
            # Clients have nothing to say; reading notices their close.
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        return

        tasks = {
            asyncio.create_task(pump(), name="api.stream.pump"),
            asyncio.create_task(drain_input(), name="api.stream.input"),
        }
        try:
            done, _ = await asyncio.wait({*tasks, sub.closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if sub.closed.done():
            await _close(websocket, *sub.closed.result())
        elif any(t.done() and t.exception() for t in tasks if t in done):
            await _close(websocket, 1013, "client too slow: a send timed out")


# The document as served at api.example.org, its channels, operations and components
# left out (the whole is some 11 kB).
_ASYNCAPI_HEAD = {
    k: v
    for k, v in asyncapi.document("api.example.org", secure=True).items()
    if k not in ("channels", "operations", "components")
}


@router.get(
    asyncapi.PATH,
    summary="The stream's AsyncAPI document",
    response_description="An AsyncAPI 3.0 document (JSON)",
    responses={
        200: {
            "content": {
                "application/json": {
                    "examples": {
                        "head": {
                            "summary": "Its head (channels, operations, components left out)",
                            "value": _ASYNCAPI_HEAD,
                        }
                    }
                }
            }
        }
    },
)
async def stream_asyncapi(request: Request) -> dict[str, Any]:
    """How ``/v1/stream`` (a WebSocket, not in this OpenAPI document) works, as an
    AsyncAPI 3.0 document: its query parameters, authentication, each message the server
    sends (``subscribed``, ``telemetry``, ``status``, ``alarm``, ``file``) with its
    schema, and the close codes. Needs no key, as this document does not."""
    return asyncapi.document(request.url.netloc, secure=request.url.scheme == "https")
