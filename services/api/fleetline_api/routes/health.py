"""Probes and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetline_api.deps import PoolDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database does not answer"}})
async def readyz(pool: PoolDep, response: Response) -> dict[str, str]:
    """The database answers."""
    try:
        async with pool.acquire(timeout=2) as con:
            await con.fetchval("SELECT 1")
    except Exception:
        response.status_code = 503
        return {"status": "database unreachable"}
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
