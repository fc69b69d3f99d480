"""Bodies of ``/v1/apikeys``: a new key's request, the key as listed (never its secret),
and the key as created (its token, this once)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.config import JsonDict

from fleetline.apikeys import Scope

KeyId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{12}$")]
KeyName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "grafana reader", "scopes": ["telemetry:read"]},
                {"name": "operations", "scopes": ["devices:read", "devices:write"]},
            ]
        },
    )
    name: KeyName = Field(
        description="What the key is for (shown in lists and in the history "
        "of the changes it makes)"
    )
    scopes: list[Scope] = Field(
        min_length=1, max_length=16, description="What it may do; `admin` may do everything"
    )


_KEY_EXAMPLE: JsonDict = {
    "id": "k3x9q2mz7d1a",
    "name": "grafana reader",
    "scopes": ["telemetry:read"],
    "state": "active",
    "created_at": "2026-11-25T14:25:45.049Z",
    "last_used_at": "2026-11-25T15:02:10.500Z",
    "revoked_at": None,
}


class ApiKeyPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_KEY_EXAMPLE]})
    id: str = Field(description="The key's id: the part after `flk_` of its token")
    name: str
    scopes: list[str]
    state: Literal["active", "revoked"]
    created_at: datetime
    last_used_at: datetime | None = Field(description="Within a minute")
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_KEY_EXAMPLE,
                    "last_used_at": None,
                    "token": "flk_k3x9q2mz7d1a_" + "q" * 43,
                }
            ]
        }
    )
    token: str = Field(
        description="The key itself (`Authorization: Bearer <token>`): shown in this answer "
        "only, never again"
    )


class ApiKeyList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_KEY_EXAMPLE]}]})
    items: list[ApiKeyPublic]
