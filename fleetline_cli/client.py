"""A small REST client for the command line (FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from fleetline_cli import localenv

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The API answered with a problem (RFC 9457), or could not be reached (``status``
    None). Its text is one line that says what to do."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# Close codes after which reconnecting cannot help (fleetline_api/routes/stream.py).
FATAL_CLOSE_CODES = {1008, 4401, 4403}
RECONNECT_MAX_SECONDS = 30.0


def _key(key: str | None) -> str:
    key = key or os.environ.get("FLEETLINE_API_KEY")
    if not key:
        raise ApiError(
            "no API key: set FLEETLINE_API_KEY (make one with "
            "`fleetline apikey create --scope admin`)"
        )
    return key


def _base_url(url: str | None) -> str:
    return url or os.environ.get("FLEETLINE_API_URL") or DEFAULT_API_URL


async def stream_events(
    params: dict[str, Any], *, url: str | None = None, key: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Events of ``/v1/stream``, reconnecting (with backoff) when the stream drops."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

    token = _key(key)
    base = urlsplit(_base_url(url))
    scheme = "wss" if base.scheme == "https" else "ws"
    query = urlencode({k: v for k, v in params.items() if v}, doseq=True)
    ws_url = f"{scheme}://{base.netloc}{base.path.rstrip('/')}/v1/stream?{query}"
    attempt = 0
    while True:
        try:
            async with connect(
                ws_url, additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                async for message in ws:
                    attempt = 0
                    yield json.loads(message)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            reason = exc.rcvd.reason if exc.rcvd else "connection lost"
            if code in FATAL_CLOSE_CODES:
                hint = " (check FLEETLINE_API_KEY)" if code == 4401 else ""
                raise ApiError(f"stream closed ({code}): {reason}{hint}") from None
        except (OSError, InvalidStatus, InvalidURI) as exc:
            if isinstance(exc, InvalidURI) or attempt >= 5:
                raise ApiError(
                    f"cannot open the stream at {ws_url} ({exc}): is the API running? "
                    + localenv.hint("FLEETLINE_API_URL")
                ) from None
        await asyncio.sleep(min(RECONNECT_MAX_SECONDS, 0.5 * 2**attempt))
        attempt += 1


def unreachable(url: object, exc: Exception) -> ApiError:
    return ApiError(
        f"cannot reach the API at {url} ({exc or type(exc).__name__}): is it running? "
        + localenv.hint("FLEETLINE_API_URL")
    )


def _problem(resp: httpx.Response) -> ApiError:
    """The problem's status, title and detail on one line, with a hint where one helps."""
    try:
        problem = resp.json()
        if not isinstance(problem, dict):
            raise ValueError("not a problem")
        text = f"{problem.get('status', resp.status_code)} {problem.get('title', '')}"
        detail = problem.get("detail")
        errors = problem.get("errors") or []
        if errors and isinstance(errors[0], dict) and errors[0].get("msg"):
            detail = f"{detail or 'invalid'} ({errors[0]['msg']})"
        if detail:
            text += f": {detail}"
    except ValueError:
        text = f"{resp.status_code} {resp.reason_phrase}"
    if resp.status_code == 401:
        text += " (check FLEETLINE_API_KEY; `fleetline apikey create` makes a key)"
    elif resp.status_code == 403:
        text += " (use a key with that scope: `fleetline apikey create --scope ...`)"
    elif resp.status_code == 412:  # If-Match: only a twin's desired properties take one
        text += " (the desired properties changed: `fleetline twin show` gives the etag)"
    return ApiError(" ".join(text.split()), status=resp.status_code)


class ApiClient:
    def __init__(self, url: str | None = None, key: str | None = None) -> None:
        key = _key(key)
        self._http = httpx.Client(
            base_url=_base_url(url),
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise unreachable(self._http.base_url, exc) from None
        if resp.is_success:
            return resp.json() if resp.content else None
        raise _problem(resp)

    def download(self, path: str, target: Path) -> int:
        """The body of ``GET path`` streamed into ``target``; its size."""
        try:
            with self._http.stream("GET", path) as resp:
                if not resp.is_success:
                    resp.read()
                    raise _problem(resp)
                size = 0
                with target.open("wb") as out:
                    for chunk in resp.iter_bytes():
                        out.write(chunk)
                        size += len(chunk)
                return size
        except httpx.HTTPError as exc:
            raise unreachable(self._http.base_url, exc) from None

    def pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paged listing."""
        params = dict(params)
        while True:
            page = self.request("GET", path, params=params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]
