"""Query parameters that several routes take, and the SQL conditions they make (their
text: queries/devices.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import StringConstraints

from fleetline_api.queries import devices as sql


def parse_tags(tag: list[str]) -> dict[str, str] | None:
    """The filter as an object; None when it asks one tag for two values (nothing matches).
    The query pattern guarantees name=value."""
    wanted: dict[str, str] = {}
    for name, _sep, value in (item.partition("=") for item in tag):
        if wanted.setdefault(name, value) != value:
            return None
    return wanted


TagFilter = Annotated[
    list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}=.{0,256}$")]],
    Query(description="name=value (string values); repeat to require several"),
]
StatusFilter = Annotated[Literal["online", "offline"] | None, Query()]


def device_filter(
    tag: list[str], status: str | None, cursor: str | None, *, first: int
) -> tuple[str, list[Any]] | None:
    """SQL conditions on devices ``d`` (with their activity ``a``) and their parameters,
    numbered from ``$first``: tags, connection status, and the page after ``cursor``.
    None when no device can match (one tag asked for two values)."""
    wanted = parse_tags(tag)
    if wanted is None:
        return None
    return sql.device_conditions(wanted, status, cursor, first=first)
