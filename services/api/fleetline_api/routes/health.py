"""Probes and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetline import db
from fleetline_api.deps import PoolDep
from fleetline_api.problems import Problem

router = APIRouter(tags=["health"])
# On the API's own port only with FLEETLINE_API_METRICS_PORT=0; else on the metrics
# listener (fleetline/service.py serve_probes, started by app.py).
metrics_router = APIRouter(tags=["health"])


def _example(status: str, summary: str) -> dict[int | str, dict[str, Any]]:
    """The success response's example: ``{"status": status}``."""
    example = {status: {"summary": summary, "value": {"status": status}}}
    return {200: {"content": {"application/json": {"examples": example}}}}


@router.get("/healthz", summary="Liveness: the process answers", responses=_example("ok", "Alive"))
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database and broker reachable",
    responses={**_example("ready", "Ready"), 503: {"model": Problem, "description": "Not ready"}},
)
async def readyz(pool: PoolDep, request: Request) -> dict[str, str]:
    """The database answers (within 2 s) and the broker connection is up."""
    if not await db.answers(pool):
        raise HTTPException(503, "the database does not answer")
    if not request.state.broker.connected:
        raise HTTPException(503, "not connected to the MQTT broker")
    return {"status": "ready"}


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
