"""The AsyncAPI 3.0 document of ``/v1/stream`` (a WebSocket, which OpenAPI cannot
describe): its query parameters, how a client authenticates, the messages the server
sends and the close codes. Served at ``GET /v1/stream/asyncapi.json`` and linked from the
OpenAPI document's description and its ``stream`` tag. The behaviour it describes is
fleetline_api/routes/stream.py's and fleetline_api/workers/stream.py's."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fleetline import __version__
from fleetline_api.schemas.files import FILE_EXAMPLE, DeviceFile
from fleetline_api.schemas.rules import ALARM_EXAMPLE, AlarmPublic

PATH = "/v1/stream/asyncapi.json"

# (code, when the server closes with it): what a client should do is in the text.
CLOSE_CODES: list[tuple[int, str]] = [
    (4401, "No API key, or an unknown or revoked one: fix the key, do not retry as is"),
    (4403, "The key lacks the telemetry:read scope"),
    (1008, "A query parameter makes no sense (one tag given two values)"),
    (
        1013,
        "Try again later: the client read too slowly (its queue filled, or a send took over "
        "10 s), too many clients on this API process, the stream not yet connected to its "
        "sources, this process fell behind, or events were lost on the way (a gap in a "
        "publisher's sequence numbers). Reconnect; events stored meanwhile are not "
        "replayed: read them over REST",
    ),
    (
        1011,
        "The stream lost its broker or database connection: reconnect",
    ),
]

_TS = {"type": "string", "format": "date-time", "description": "When it happened (UTC)"}
_DEVICE = {"type": "string", "description": "The device's id"}


_ALARM_EXAMPLE: dict[str, Any] = {
    "type": "alarm",
    "device_id": "fridge-1",
    "ts": "2026-11-25T14:25:45.049Z",
    # The REST example's alarm at the moment it was raised.
    "alarm": {
        **ALARM_EXAMPLE,
        "state": "active",
        "acknowledged_at": None,
        "acknowledged_by": None,
        "peak": 9.1,
        "count": 1,
        "updated_at": "2026-11-25T14:25:45.049Z",
    },
}
_FILE_EXAMPLE: dict[str, Any] = {
    "type": "file",
    "device_id": FILE_EXAMPLE["device_id"],
    "ts": FILE_EXAMPLE["completed_at"],
    "file": FILE_EXAMPLE,  # the REST example of a file, as it landed
}


def _model(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON Schema, its definitions hoisted into ``schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event(kind: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", *required],
        "properties": {"type": {"const": kind}, **properties},
    }


def document(host: str, secure: bool) -> dict[str, Any]:
    """The document, its server at ``host`` (``wss`` when ``secure``)."""
    schemas: dict[str, Any] = {}
    alarm = _model(AlarmPublic, schemas)
    file = _model(DeviceFile, schemas)
    close_codes = "\n".join(f"- `{code}`: {why}" for code, why in CLOSE_CODES)
    messages: dict[str, Any] = {
        "subscribed": {
            "name": "subscribed",
            "title": "Subscribed",
            "summary": "The first message: the filters in force; events stored from now on follow",
            "payload": _event(
                "subscribed",
                {
                    "devices": {"type": "array", "items": {"type": "string"}},
                    "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                    "metrics": {"type": "array", "items": {"type": "string"}},
                    "events": {
                        "type": "array",
                        "items": {"enum": ["alarm", "file", "status", "telemetry"]},
                    },
                },
                ["devices", "tags", "metrics", "events"],
            ),
            "examples": [
                {
                    "name": "everything",
                    "payload": {
                        "type": "subscribed",
                        "devices": [],
                        "tags": {"site": "A"},
                        "metrics": [],
                        "events": ["alarm", "file", "status", "telemetry"],
                    },
                }
            ],
        },
        "telemetry": {
            "name": "telemetry",
            "title": "Telemetry",
            "summary": "A reading once stored: the values of one device at one time (only "
            "the metrics asked for)",
            "payload": _event(
                "telemetry",
                {
                    "device_id": _DEVICE,
                    "ts": _TS,
                    "values": {
                        "type": "object",
                        "description": "Metric name to value: a number, or text",
                        "additionalProperties": {"type": ["number", "string"]},
                    },
                },
                ["device_id", "ts", "values"],
            ),
            "examples": [
                {
                    "name": "reading",
                    "payload": {
                        "type": "telemetry",
                        "device_id": "sim-0001",
                        "ts": "2026-11-25T14:25:45.049Z",
                        "values": {"temperature": 21.9, "door": "closed"},
                    },
                }
            ],
        },
        "status": {
            "name": "status",
            "title": "Status",
            "summary": "A device went online or offline",
            "payload": _event(
                "status",
                {"device_id": _DEVICE, "online": {"type": "boolean"}, "ts": _TS},
                ["device_id", "online", "ts"],
            ),
            "examples": [
                {
                    "name": "offline",
                    "payload": {
                        "type": "status",
                        "device_id": "sim-0001",
                        "online": False,
                        "ts": "2026-11-25T14:26:01.100Z",
                    },
                }
            ],
        },
        "alarm": {
            "name": "alarm",
            "title": "Alarm",
            "summary": "An alarm raised, updated, acknowledged or cleared: the alarm as "
            "GET /v1/alarms/{id} shows it",
            "payload": _event(
                "alarm", {"device_id": _DEVICE, "ts": _TS, "alarm": alarm}, ["device_id", "alarm"]
            ),
            "examples": [{"name": "raised", "payload": _ALARM_EXAMPLE}],
        },
        "file": {
            "name": "file",
            "title": "File",
            "summary": "A file a device uploaded has landed, complete (docs/uploads.md)",
            "payload": _event(
                "file", {"device_id": _DEVICE, "ts": _TS, "file": file}, ["device_id", "file"]
            ),
            "examples": [{"name": "landed", "payload": _FILE_EXAMPLE}],
        },
    }
    refs = [{"$ref": f"#/channels/stream/messages/{name}"} for name in messages]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "fleetline live stream",
            "version": __version__,
            "description": (
                "`/v1/stream`: stored telemetry, status changes, alarms and landed files, "
                "live, as JSON text messages over a WebSocket. Events are sent once stored; "
                "nothing is replayed. Clients send nothing (what they send is ignored). The "
                "REST API is described by the OpenAPI document at `/openapi.json`.\n\n"
                "**Close codes**\n\n" + close_codes
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "api": {
                "host": host,
                "protocol": "wss" if secure else "ws",
                "description": "This API",
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/subprotocol"},
                ],
            }
        },
        "channels": {
            "stream": {
                "address": "/v1/stream",
                "title": "Live events",
                "description": "Filters combine (all must match); each list parameter "
                "matches any of its values.\n\n**Close codes**\n\n" + close_codes,
                "messages": messages,
                "bindings": {
                    "ws": {
                        "bindingVersion": "0.1.0",
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "device": {
                                    "type": "array",
                                    "items": _DEVICE,
                                    "maxItems": 1000,
                                    "description": "Only these devices (repeatable)",
                                },
                                "tag": {
                                    "type": "array",
                                    "items": {"type": "string", "pattern": "^[^=]+=.*$"},
                                    "description": "Only devices whose tag has this value: "
                                    "`name=value` (repeatable, different names)",
                                },
                                "metric": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "maxItems": 256,
                                    "description": "Only these metrics of telemetry events "
                                    "(repeatable); an event with none of them is not sent",
                                },
                                "events": {
                                    "type": "string",
                                    "pattern": "^(telemetry|status|alarm|file)"
                                    "(,(telemetry|status|alarm|file))*$",
                                    "default": "telemetry,status,alarm,file",
                                    "description": "The kinds of event, comma-separated",
                                },
                            },
                        },
                    }
                },
            }
        },
        "operations": {
            "sendEvents": {
                "action": "send",
                "channel": {"$ref": "#/channels/stream"},
                "title": "Events to the client",
                "summary": "`subscribed` first, then each event stored that the filters "
                "let through",
                "messages": refs,
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <API key>`; the key needs "
                    "telemetry:read",
                },
                "subprotocol": {
                    "type": "httpApiKey",
                    "name": "Sec-WebSocket-Protocol",
                    "in": "header",
                    "description": "For browsers, which cannot set headers: offer the "
                    "subprotocols `fleetline.v1` and `bearer.<API key>`; the server answers "
                    "`fleetline.v1`. The key never appears in a URL or an access log",
                },
            },
        },
    }
