"""Helpers for the OpenAPI document the routes declare."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

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


def _model_examples() -> dict[str, list[Any]]:
    """The examples of this API's models (``json_schema_extra``), by model name."""
    found: dict[str, list[Any]] = {}
    seen: set[str] = set()
    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        extra = model.model_config.get("json_schema_extra")
        if not model.__module__.startswith("fleetline_api.") or not isinstance(extra, dict):
            continue
        examples = extra.get("examples")
        if isinstance(examples, list):
            name = model.__name__
            found[name] = examples if name not in seen else found.get(name, examples)
            seen.add(name)
    return found


def restore_examples(document: dict[str, Any]) -> dict[str, Any]:
    """Put back the null members of the models' examples: FastAPI writes the document
    without any None (``exclude_none``), which drops them from examples too and leaves
    examples that lack required members."""
    examples = _model_examples()
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        if "examples" in schema and name in examples:
            schema["examples"] = examples[name]
    return document
