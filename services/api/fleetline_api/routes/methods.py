"""Direct methods: call a method on a connected device and wait for its answer.

The API publishes ``{"method": name, "params": {...}}`` (QoS 1) to
``devices/{id}/methods/{request_id}/req`` and waits up to ``timeout_s`` for the device's
``{"status": ..., "payload": ...}`` on ``.../res``. Any API replica may serve the call:
every replica sees every response and the one waiting for the request id takes it
(fleetline_api/workers/broker.py). A device is called only while its status says online; one
that went away without its Last Will yet shows up as a timeout (504).

The call itself is fleetline_api/commands.py (shared with method jobs). Params and
payloads are never logged: they may hold secrets.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request

from fleetline_api import commands
from fleetline_api.deps import BrokerDep, CommandsWrite, PoolDep
from fleetline_api.metrics import ARRIVED
from fleetline_api.problems import RESPONSES, Problem
from fleetline_api.schemas.common import DeviceId, ModuleId
from fleetline_api.schemas.methods import MethodCall, MethodName, MethodResult
from fleetline_api.workers.broker import BrokerLink

router = APIRouter(prefix="/v1/devices", tags=["methods"], responses=RESPONSES)

METHOD_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such device (or module)"},
    409: {"model": Problem, "description": "The device is offline (or has never connected)"},
    502: {"model": Problem, "description": "The device answered with a malformed response"},
    503: {
        "model": Problem,
        "description": "The API is not connected to the broker, has too many calls in "
        "flight, or the database is unreachable or did not answer in time",
    },
    504: {"model": Problem, "description": "The device did not answer within timeout_s"},
}


async def _invoke(
    request: Request,
    pool: Any,
    broker: BrokerLink,
    device_id: str,
    module_id: str,
    name: str,
    body: MethodCall | None,
) -> MethodResult:
    call = body or MethodCall()
    try:
        answer = await commands.invoke_method(
            pool,
            broker,
            device_id,
            name,
            call.params,
            timeout_s=call.timeout_s,
            module_id=module_id,
            # The timeout counts from the request's arrival: the key check's time included.
            since=getattr(request.state, ARRIVED, None),
        )
    except commands.CommandError as exc:
        raise HTTPException(exc.status, str(exc), headers=exc.headers or None) from None
    return MethodResult(request_id=answer.request_id, status=answer.status, payload=answer.payload)


MethodPath = Annotated[MethodName, Path(description="The method's name, as the device knows it")]


@router.post(
    "/{device_id}/methods/{name}",
    summary="Call a direct method on a device",
    response_model=MethodResult,
    responses=METHOD_RESPONSES,
)
async def invoke_method(
    device_id: DeviceId,
    name: MethodPath,
    request: Request,
    pool: PoolDep,
    broker: BrokerDep,
    _key: CommandsWrite,
    body: MethodCall | None = None,
) -> MethodResult:
    """Call ``name`` on the device with ``params`` and wait up to ``timeout_s`` for its
    answer: the device's own ``status`` and ``payload``. Only an online device is called."""
    return await _invoke(request, pool, broker, device_id, "", name, body)


@router.post(
    "/{device_id}/modules/{module_id}/methods/{name}",
    summary="Call a direct method on a module",
    response_model=MethodResult,
    responses=METHOD_RESPONSES,
)
async def invoke_module_method(
    device_id: DeviceId,
    module_id: ModuleId,
    name: MethodPath,
    request: Request,
    pool: PoolDep,
    broker: BrokerDep,
    _key: CommandsWrite,
    body: MethodCall | None = None,
) -> MethodResult:
    """Call ``name`` on a module of an online device: the request goes to
    ``devices/{id}/modules/{module_id}/methods/{request_id}/req``."""
    return await _invoke(request, pool, broker, device_id, module_id, name, body)
