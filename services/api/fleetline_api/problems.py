"""Errors as RFC 9457 ``application/problem+json``, for every error the API returns."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fleetline import devicequery
from fleetline_api.openapi import restore_examples

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details; validation errors add ``errors``, device query errors
    the ``position`` (0-based) of the offending text."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "device fridge-1 not found",
                    "instance": "/v1/devices/fridge-1",
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
    position: int | None = None


def problem_body(status: int, detail: str | None, instance: str | None = None) -> bytes:
    """The JSON of a problem, for answers written below FastAPI (fleetline_api/limits.py,
    fleetline_api/server.py)."""
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, instance=instance)
    return body.model_dump_json(exclude_none=True).encode()


def problem_response(
    request: Request,
    status: int,
    detail: str | None,
    *,
    errors: list[dict[str, Any]] | None = None,
    position: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
        position=position,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=dict(headers) if headers else None,
    )


# What routes document besides their success response (the media type of every error is
# set to application/problem+json in the OpenAPI document by install()).
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "A parameter makes no sense (the detail says why)"},
    503: {"model": Problem, "description": "The database is unreachable or did not answer in time"},
    401: {"model": Problem, "description": "No or an invalid API key"},
    403: {"model": Problem, "description": "The key lacks the scope"},
    422: {"model": Problem, "description": "A parameter or the body is invalid"},
    429: {"model": Problem, "description": "Too many requests with this key (Retry-After)"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "Not found"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "It exists"}}


def _problem_media_types(schema: dict[str, Any]) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if str(code)[0] in "45":
                    response["content"] = {MEDIA_TYPE: {"schema": ref}}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Problem", Problem.model_json_schema())
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return schema


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this path (a path has one route per method)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = restore_examples(_problem_media_types(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else None
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of one route; a path has one route per method.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return problem_response(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        where = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors[:5])
        return problem_response(request, 422, f"invalid {where}", errors=errors)

    @app.exception_handler(devicequery.QueryError)
    async def bad_query(request: Request, exc: devicequery.QueryError) -> JSONResponse:
        return problem_response(request, 400, str(exc), position=exc.position)

    @app.exception_handler(asyncpg.UniqueViolationError)
    async def conflict(request: Request, exc: asyncpg.UniqueViolationError) -> JSONResponse:
        return problem_response(request, 409, f"it exists already ({exc.constraint_name})")

    @app.exception_handler(asyncpg.DataError)
    async def bad_data(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        return problem_response(request, 400, f"a value is out of range ({exc.sqlstate})")

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
        return problem_response(
            request,
            503,
            "the database is unreachable or did not answer in time",
            headers={"Retry-After": "5"},
        )

    app.add_exception_handler(TimeoutError, unavailable)
    app.add_exception_handler(asyncpg.QueryCanceledError, unavailable)
    app.add_exception_handler(asyncpg.PostgresConnectionError, unavailable)
    app.add_exception_handler(asyncpg.InterfaceError, unavailable)
    # A database that is down (a refused or reset connection while the pool reconnects)
    # or shutting down, restarting or recovering from a crash (class 57: "the database
    # system is shutting down", "terminating connection due to administrator command").
    app.add_exception_handler(ConnectionError, unavailable)
    app.add_exception_handler(asyncpg.exceptions.OperatorInterventionError, unavailable)
    # Its name not resolving (a failover's DNS), or no connection left for the API
    # (53300, a reconnection storm after a restart).
    app.add_exception_handler(socket.gaierror, unavailable)
    app.add_exception_handler(asyncpg.exceptions.InsufficientResourcesError, unavailable)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response, and the server logs the traceback.
        return problem_response(request, 500, "unexpected error; it was logged")
