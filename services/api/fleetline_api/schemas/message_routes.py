"""Request and response bodies of /v1/routes (message routes).

A route takes the readings of the devices its ``query`` selects (every device when it
has none); with a ``metric``, only readings carrying that metric, and with a
``condition``, only those whose value meets it. It forwards each to its
``destination``: a webhook or an MQTT topic. The webhook ``secret`` is write-only, as a
rule action's is: responses show ``********``, and sending that mask back in a PUT keeps
the stored secret.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetline import devicequery
from fleetline_api.schemas.common import TEMPERATURE_EXAMPLE, MetricName
from fleetline_api.schemas.query import QUERY_DESCRIPTION
from fleetline_api.schemas.rules import Name, Number, Secret, Url

# Checked in the route handler (a 400 that says why): no wildcards, not under devices/
# and not starting with $.
Topic = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]
DeliveryState = Literal["pending", "delivered", "failed"]


class _Body(BaseModel):
    # Strict: "1" is not a number and 0 is not false (the OpenAPI types say so).
    model_config = ConfigDict(extra="forbid", strict=True)


class RouteComparison(_Body):
    """The metric's value compared with ``value``."""

    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Number


class RouteOutside(_Body):
    """True when the metric's value is below ``low`` or above ``high``."""

    op: Literal["outside"]
    low: Number
    high: Number


RouteCondition = Annotated[RouteComparison | RouteOutside, Field(discriminator="op")]


class WebhookDestination(_Body):
    """A JSON POST per reading; with a secret, the header ``X-Fleetline-Signature:
    sha256=<hex HMAC-SHA256 of the body>``."""

    type: Literal["webhook"]
    url: Url
    secret: Secret | None = Field(default=None, description="Write-only; shown masked")


class MqttDestination(_Body):
    """A QoS 1 publish per reading on ``topic``: a topic name (no ``+``/``#``), not under
    ``devices/`` (the devices' own namespace) and not starting with ``$``."""

    type: Literal["mqtt"]
    topic: Topic


Destination = Annotated[WebhookDestination | MqttDestination, Field(discriminator="type")]


ROUTE_IN_EXAMPLE: dict[str, Any] = {
    "name": "temperatures to the plant's broker",
    "source": "readings",
    "query": "tags.site = 'A'",
    "metric": "temperature",
    "destination": {"type": "mqtt", "topic": "plant/a/temperature"},
}


class RouteIn(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [ROUTE_IN_EXAMPLE]})
    name: Name
    enabled: bool = True
    source: Literal["readings", "files"] = Field(
        default="readings",
        description="readings: each reading the devices send; files: each file they upload "
        "(its name, size, SHA-256 and content type, once complete), with no metric",
    )
    query: str = Field(
        default="", max_length=devicequery.MAX_QUERY_LENGTH, description=QUERY_DESCRIPTION
    )
    metric: MetricName | None = Field(
        default=None, description="Only readings carrying this metric, and only its value"
    )
    condition: RouteCondition | None = Field(
        default=None, description="On `metric`'s value (numbers and booleans as 1/0)"
    )
    destination: Destination


# The route above, as stored.
ROUTE_EXAMPLE: dict[str, Any] = {
    "id": 3,
    **ROUTE_IN_EXAMPLE,
    "enabled": True,
    "condition": None,
    "version": 1,
    "created_at": "2026-11-25T14:25:45.049Z",
    "updated_at": "2026-11-25T14:25:45.049Z",
}


class RoutePublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ROUTE_EXAMPLE]})
    id: int
    name: str
    enabled: bool
    source: str
    query: str
    metric: str | None
    condition: dict[str, Any] | None
    destination: dict[str, Any] = Field(description="The secret shown as ********")
    version: int
    created_at: datetime
    updated_at: datetime


class RoutePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [ROUTE_EXAMPLE], "next_cursor": None}]}
    )
    items: list[RoutePublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


# The example device's temperature, forwarded by the route above.
ROUTE_DELIVERY_EXAMPLE: dict[str, Any] = {
    "id": 5120,
    "device_id": "fridge-1",
    "ts": TEMPERATURE_EXAMPLE["ts"],
    "values": {"temperature": TEMPERATURE_EXAMPLE["value"]},
    "status": "delivered",
    "attempts": 1,
    "next_attempt_at": "2026-11-25T14:25:45.180Z",
    "last_error": None,
    "response_status": None,
    "created_at": "2026-11-25T14:25:45.180Z",
    "delivered_at": "2026-11-25T14:25:45.204Z",
}


class RouteDelivery(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ROUTE_DELIVERY_EXAMPLE]})
    id: int
    device_id: str
    ts: datetime = Field(description="The reading's time")
    values: dict[str, Any] = Field(description="What was forwarded")
    status: DeliveryState
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    response_status: int | None = Field(description="The webhook's HTTP status")
    created_at: datetime
    delivered_at: datetime | None


class RouteDeliveryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [ROUTE_DELIVERY_EXAMPLE], "next_cursor": None}]}
    )
    items: list[RouteDelivery] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
