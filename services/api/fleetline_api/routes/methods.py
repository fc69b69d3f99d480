"""Direct methods: call a method on a connected device and wait for its answer.

The API publishes ``{"method": name, "params": {...}}`` (QoS 1) to
``devices/{id}/methods/{request_id}/req`` and waits up to ``timeout_s`` for the device's
``{"status": ..., "payload": ...}`` on ``.../res``. Any API replica may serve the call:
every replica sees every response and the one waiting for the request id takes it
(fleetline_api/broker.py). A device is called only while its status says online; one
that went away without its Last Will yet shows up as a timeout (504).

Params and payloads are never logged: they may hold secrets.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from prometheus_client import Counter, Histogram

from fleetline.apikeys import KeyInfo
from fleetline_api.broker import (
    BrokerLink,
    BrokerUnavailableError,
    MethodTimeoutError,
    TooManyCallsError,
)
from fleetline_api.deps import PoolDep, require
from fleetline_api.method_schemas import (
    MethodCall,
    MethodName,
    MethodResult,
    encode_params,
    parse_answer,
)
from fleetline_api.problems import RESPONSES, Problem
from fleetline_api.schemas import DeviceId

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/devices", tags=["methods"], responses=RESPONSES)

OUTCOMES = (
    "answered",  # the device answered (whatever status it gave)
    "malformed",  # 502
    "timeout",  # 504
    "offline",  # 409
    "not_found",  # 404
    "unavailable",  # 503: no broker connection
    "overloaded",  # 503: too many calls in flight
)
CALLS = Counter("fleetline_api_method_calls_total", "Direct method calls by outcome", ["outcome"])
for _outcome in OUTCOMES:
    CALLS.labels(_outcome)
LATENCY = Histogram(
    "fleetline_api_method_call_seconds",
    "From publishing a direct method request to the device's answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

CommandsWrite = Annotated[KeyInfo, Depends(require("commands:write"))]


async def get_broker(request: Request) -> BrokerLink:
    broker: BrokerLink = request.state.broker
    return broker


BrokerDep = Annotated[BrokerLink, Depends(get_broker)]

DEVICE_ONLINE = """
SELECT a.online FROM devices d LEFT JOIN device_activity a ON a.device_id = d.id
WHERE d.id = $1
"""

METHOD_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such device"},
    409: {"model": Problem, "description": "The device is offline (or has never connected)"},
    502: {"model": Problem, "description": "The device answered with a malformed response"},
    503: {
        "model": Problem,
        "description": "The API is not connected to the broker, has too many calls in "
        "flight, or the database did not answer in time",
    },
    504: {"model": Problem, "description": "The device did not answer within timeout_s"},
}


@router.post("/{device_id}/methods/{name}", response_model=MethodResult, responses=METHOD_RESPONSES)
async def invoke_method(
    device_id: DeviceId,
    name: Annotated[MethodName, Path(description="The method's name, as the device knows it")],
    pool: PoolDep,
    broker: BrokerDep,
    _key: CommandsWrite,
    body: MethodCall | None = None,
) -> MethodResult:
    """Call ``name`` on the device with ``params`` and wait up to ``timeout_s`` for its
    answer: the device's own ``status`` and ``payload``. Only an online device is called."""
    call = body or MethodCall()
    exists = await pool.fetchrow(DEVICE_ONLINE, device_id)
    if exists is None:
        CALLS.labels("not_found").inc()
        raise HTTPException(404, f"device {device_id} not found")
    if exists["online"] is not True:
        CALLS.labels("offline").inc()
        raise HTTPException(409, f"device {device_id} is offline")
    request_id = uuid.uuid4().hex
    request = b'{"method":%s,"params":%s}' % (json.dumps(name).encode(), encode_params(call.params))
    fields = {"device_id": device_id, "method": name, "request_id": request_id}
    started = time.monotonic()
    try:
        raw = await broker.call(device_id, request_id, request, timeout_seconds=call.timeout_s)
    except BrokerUnavailableError as exc:
        CALLS.labels("unavailable").inc()
        log.warning("method call not sent: %s", exc, extra=fields)
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
    except TooManyCallsError as exc:
        CALLS.labels("overloaded").inc()
        log.warning("method call refused: %s", exc, extra=fields)
        raise HTTPException(
            503, f"too many calls in flight ({exc})", headers={"Retry-After": "1"}
        ) from None
    except MethodTimeoutError:
        CALLS.labels("timeout").inc()
        log.info("method call timed out", extra={**fields, "timeout_s": call.timeout_s})
        raise HTTPException(
            504,
            f"device {device_id} did not answer {name} within {call.timeout_s} s "
            f"(request {request_id})",
        ) from None
    elapsed = time.monotonic() - started
    LATENCY.observe(elapsed)
    duration_ms = round(elapsed * 1000, 1)
    answer = parse_answer(raw)
    if answer is None:
        CALLS.labels("malformed").inc()
        log.warning(
            "device answered with a malformed response",
            extra={**fields, "bytes": len(raw), "duration_ms": duration_ms},
        )
        raise HTTPException(
            502, f"device answered with a malformed response (request {request_id})"
        )
    CALLS.labels("answered").inc()
    log.info(
        "method call answered",
        extra={**fields, "status": answer.status, "duration_ms": duration_ms},
    )
    return MethodResult(request_id=request_id, status=answer.status, payload=answer.payload)
