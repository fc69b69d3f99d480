"""Request and response bodies of direct methods (``POST /v1/devices/{id}/methods/{name}``).

The request the device receives on ``devices/{id}/methods/{request_id}/req`` is
``{"method": name, "params": {...}}`` (docs/protocol.md, section 6), as the rules service sends its
commands; the device answers on ``.../res`` with ``{"status": 200, "payload": ...}``.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator

from fleetline import protocol
from fleetline_api.schemas.common import WholeNumber

# A method name: like a metric name, but not made of dots only (".." would be read as a
# path segment by HTTP clients).
MethodName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]
MAX_PARAMS_BYTES = 8192
MAX_TIMEOUT_SECONDS = 300
# A device's answer larger than this is refused as malformed (502).
MAX_RESPONSE_BYTES = 256 * 1024


def encode_params(params: dict[str, Any]) -> bytes:
    """The params as compact JSON. The standard library keeps integers of any size, and
    escapes non-ASCII (a lone surrogate from the request stays encodable); NaN is refused."""
    return json.dumps(params, separators=(",", ":"), allow_nan=False).encode()


def params_problem(params: dict[str, Any]) -> str | None:
    """Why ``params`` may not be sent; None when they may. A NUL character (in a string or
    a member name) is refused: a method job keeps its params as jsonb, which cannot hold
    it, and a direct call refuses what a job would (400 both)."""
    # Depth is bounded by the size (MAX_PARAMS_BYTES) and checked nowhere else.
    problem = protocol.json_problem(params, max_depth=MAX_PARAMS_BYTES + 1, path="params")
    if problem is None:
        return None
    if problem.kind == "member_name":
        return f"a member name in {problem.path} contains a NUL character"
    return f"{problem.path} contains a NUL character"


class MethodCall(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"params": {"seconds": 5}, "timeout_s": 30}]},
    )

    params: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Passed to the device as is; at most {MAX_PARAMS_BYTES} bytes as JSON",
    )
    timeout_s: WholeNumber = Field(
        default=30,
        ge=1,
        le=MAX_TIMEOUT_SECONDS,
        description="How long to wait for the device's answer, in seconds",
    )

    @field_validator("params")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(encode_params(value))
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"params take {size} bytes as JSON, more than {MAX_PARAMS_BYTES}")
        return value


class DeviceAnswer(BaseModel):
    """What a device publishes on ``devices/{id}/methods/{request_id}/res``."""

    model_config = ConfigDict(extra="ignore")

    status: StrictInt
    payload: Any = None


class MethodResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"request_id": "8c1f0c3e2b7d4a51", "status": 200, "payload": {"rebooting_in_s": 5}}
            ]
        }
    )
    request_id: str = Field(description="The id in the request and response topics")
    status: int = Field(description="The status the device answered with (its own code)")
    payload: Any = Field(description="The device's answer, as it sent it")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent; beyond a double (1e400) it would be
    read as infinity, which neither JSON nor jsonb can carry back."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


# Deeper answers are malformed: the API could not encode them back (pydantic's limit).
MAX_ANSWER_DEPTH = 64


def _depth(doc: Any) -> int:
    """Nesting depth of a JSON document, without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_ANSWER_DEPTH:
            break
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_answer(raw: bytes) -> DeviceAnswer | None:
    """The device's answer; None when it is not JSON of the protocol's shape, or holds
    what the API could not answer with or a method job could not keep (jsonb): a lone
    surrogate, a NUL character, a number beyond a double, nesting beyond
    MAX_ANSWER_DEPTH."""
    if len(raw) > MAX_RESPONSE_BYTES:
        return None
    try:
        doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
        # What the API answers must encode again: no lone surrogates ("\\ud800").
        json.dumps(doc, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        return None
    if not isinstance(doc, dict) or _depth(doc) > MAX_ANSWER_DEPTH:
        return None
    if protocol.json_problem(doc, max_depth=MAX_ANSWER_DEPTH) is not None:  # a NUL
        return None
    try:
        return DeviceAnswer.model_validate(doc)
    except ValueError:  # pydantic's ValidationError
        return None
