"""Helpers for the OpenAPI document the routes declare."""

from __future__ import annotations

from typing import Any

# A request body of raw bytes (a part of an upload), which the route reads itself.
BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def links(path: str, *names: str) -> dict[str, Any]:
    """OpenAPI links from a response to the operations that take the id it holds: each
    name is ``link:operationId:parameter``, the id at ``path`` of the response body."""
    return {
        name: {"operationId": operation, "parameters": {param: f"$response.body#{path}"}}
        for name, operation, param in (n.split(":") for n in names)
    }
