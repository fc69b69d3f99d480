"""Dead letters: device messages ingest could not store, with the reason (newest first)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleetline_api.deps import PoolDep, TelemetryRead
from fleetline_api.problems import RESPONSES
from fleetline_api.queries import dead_letters as sql
from fleetline_api.schemas.common import DeadLetter, DeadLetterPage, DeviceId

router = APIRouter(prefix="/v1/dead-letters", tags=["dead-letters"], responses=RESPONSES)

# Enough of a payload to see what was wrong; the full bytes stay in the database.
PAYLOAD_PREVIEW_BYTES = 4096


@router.get(
    "", summary="List dead letters (messages ingest could not store)", response_model=DeadLetterPage
)
async def list_dead_letters(
    pool: PoolDep,
    _key: TelemetryRead,
    device_id: Annotated[DeviceId | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> DeadLetterPage:
    """Newest first, optionally of one device id (as the topic named it)."""
    rows = await pool.fetch(
        sql.LIST_DEAD_LETTERS,
        device_id,
        cursor,
        limit + 1,
        PAYLOAD_PREVIEW_BYTES,
    )
    items = [
        DeadLetter(
            id=r["id"],
            received_at=r["received_at"],
            topic=r["topic"],
            device_id=r["device_id"],
            reason=r["reason"],
            payload_text=bytes(r["head"]).decode("utf-8", errors="replace"),
            payload_size=r["payload_size"],
        )
        for r in rows[:limit]
    ]
    return DeadLetterPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)
