"""A small REST client for the command line (FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The API answered with a problem (RFC 9457), or could not be reached."""


class ApiClient:
    def __init__(self, url: str | None = None, key: str | None = None) -> None:
        key = key or os.environ.get("FLEETLINE_API_KEY")
        if not key:
            raise ApiError("set FLEETLINE_API_KEY (create one: fleetline apikey create)")
        self._http = httpx.Client(
            base_url=url or os.environ.get("FLEETLINE_API_URL", DEFAULT_API_URL),
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self._http.base_url}: {exc}") from None
        if resp.is_success:
            return resp.json() if resp.content else None
        try:
            problem = resp.json()
            text = f"{problem.get('status')} {problem.get('title')}: {problem.get('detail', '')}"
        except ValueError:
            text = f"{resp.status_code} {resp.reason_phrase}"
        raise ApiError(text)

    def pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paged listing."""
        params = dict(params)
        while True:
            page = self.request("GET", path, params=params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]
