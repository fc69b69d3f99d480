"""``/v1/transfers/{grant}``: what a device downloads with the short-lived URL it asked
for over MQTT (transfers.py). No API key: the URL is signed for one device
(grants.py), which proves itself as well (deviceauth.py). 403 for a URL past its expiry,
not signed here, or signed for another device; 401 when the device's credentials are
missing or wrong.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Request
from fastapi.responses import Response

from fleetline_api import deviceauth, downloads, grants
from fleetline_api.deps import PoolDep, SettingsDep
from fleetline_api.problems import RESPONSES, Problem
from fleetline_api.queries import firmware as sql
from fleetline_api.transfers import TRANSFERS_PATH, TransferDesk

router = APIRouter(prefix=TRANSFERS_PATH, tags=["transfers"], responses=RESPONSES)

Token = Annotated[str, Path(max_length=grants.MAX_TOKEN_CHARS, description="The grant")]


def _grant(request: Request, token: str, kind: str) -> grants.Grant:
    desk: TransferDesk = request.state.transfers
    try:
        grant = desk.verify(token)
    except grants.GrantError as exc:
        raise HTTPException(403, str(exc)) from None
    if grant.kind != kind:
        raise HTTPException(403, f"this URL is for a {grant.kind} transfer, not a {kind} one")
    return grant


@router.get(
    "/{token}",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The image"},
        206: {"content": {"application/octet-stream": {}}, "description": "The range asked"},
        401: {"model": Problem, "description": "The device's credentials are missing or wrong"},
        403: {"model": Problem, "description": "Expired, not signed here, or another device's"},
        404: {"model": Problem, "description": "The release was deleted meanwhile"},
        416: {"model": Problem, "description": "The range is not within the image"},
    },
    response_class=Response,
)
async def download(
    token: Token,
    request: Request,
    pool: PoolDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(max_length=1024)] = None,
    range_header: Annotated[
        str | None, Header(alias="range", description="bytes=START-END, START- or -N")
    ] = None,
) -> Response:
    """A firmware image, whole or one range of it (a download resumes with Range)."""
    grant = _grant(request, token, "firmware")
    await deviceauth.check(
        pool, settings.key_secret, grant.device_id, deviceauth.claim(authorization)
    )
    row = await pool.fetchrow(sql.GET_CONTENT, grant.object_id)
    if row is None or row["manifest"] is None:
        raise HTTPException(404, f"firmware {grant.object_id} is no longer there")
    return downloads.serve_image(
        pool, int(row["blob_id"]), row["size"], row["sha256"], range_header
    )
