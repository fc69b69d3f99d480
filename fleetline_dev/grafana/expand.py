"""A panel's SQL as Grafana's PostgreSQL data source sends it to the database: template
variables, then $__interval, $__interval_ms and $__unixEpochFrom()/$__unixEpochTo(),
then the macros of Grafana's postgres macro engine with the data source's
``timescaledb: false`` (deploy/grafana/provisioning/datasources/fleetline.yaml). For the
tests and benchmarks, which cannot run a Grafana server."""

from __future__ import annotations

import re
from datetime import UTC, datetime

# Grafana's interval units, in seconds.
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(interval: str) -> float:
    """Seconds of an interval as Grafana writes it ("5s", "1m", "1h")."""
    found = re.fullmatch(r"(\d+)(ms|s|m|h|d)", interval.strip("'"))
    if not found:
        raise ValueError(f"not a Grafana interval: {interval!r}")
    return int(found[1]) * UNITS[found[2]]


def go_number(value: float) -> str:
    """A float as Go's %v prints it (60 -> 60, 0.5 -> 0.5), as the macros write it."""
    return str(int(value)) if value == int(value) else repr(value)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sqlstring(values: list[str]) -> str:
    """${var:sqlstring}: each value quoted, quotes doubled, joined by commas."""
    return ",".join("'" + v.replace("'", "''") + "'" for v in values)


def expand(
    sql: str, start: datetime, end: datetime, interval: str, variables: dict[str, list[str]]
) -> str:
    """The SQL Grafana sends for the range [start, end], its $__interval and the values
    of the dashboard's variables. Raises ValueError for a macro Grafana does not know."""
    sql = re.sub(r"\$\{(\w+):sqlstring\}", lambda m: sqlstring(variables[m[1]]), sql)
    sql = re.sub(r"\$(?!__)(\w+)", lambda m: ",".join(variables[m[1]]), sql)
    sql = sql.replace("$__interval_ms", str(int(seconds(interval) * 1000)))
    sql = sql.replace("$__interval", interval)
    sql = sql.replace("$__unixEpochFrom()", str(int(start.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(end.timestamp())))

    def macro(m: re.Match[str]) -> str:
        name, args = m[1], [a.strip() for a in m[2].split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{rfc3339(start)}' AND '{rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{rfc3339(end)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            width = go_number(seconds(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{width})*{width}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise ValueError(f"unknown macro ${name}")

    return re.sub(r"\$(\w+)\(([^)]*)\)", macro, sql)
