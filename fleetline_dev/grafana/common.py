"""What every fleetline dashboard shares: the data source, SQL targets, the choice of
raw readings or rollups by the width of the time range, and panels with units.

Grafana's SDK (grafana-foundation-sdk) has no PostgreSQL query type; ``Sql`` is one, in
the shape Grafana's PostgreSQL data source saves (``rawSql``, ``format``).
"""

from __future__ import annotations

from typing import Literal

from grafana_foundation_sdk.builders import dashboard, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

# deploy/grafana/provisioning/datasources/fleetline.yaml
DATASOURCE = model.DataSourceRef(type_val="grafana-postgresql-datasource", uid="fleetline-postgres")
TAGS = ["fleetline"]

# The width of the time range, in seconds, as Grafana expands it.
RANGE = "($__unixEpochTo() - $__unixEpochFrom())"
HOUR = 3600
DAY = 86400

Format = Literal["time_series", "table"]


class SqlQuery(cogvariants.Dataquery):
    """A raw SQL target of Grafana's PostgreSQL data source."""

    def __init__(self, sql: str, fmt: Format, ref_id: str = "A") -> None:
        self.sql = sql
        self.format = fmt
        self.ref_id = ref_id

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": DATASOURCE.to_json(),
            "editorMode": "code",
            "format": self.format,
            "rawQuery": True,
            "rawSql": self.sql,
        }


class Sql(cogbuilder.Builder[SqlQuery]):
    def __init__(self, sql: str, fmt: Format = "table") -> None:
        self._query = SqlQuery(sql.strip(), fmt)

    def build(self) -> SqlQuery:
        return self._query


def by_range(
    rolled: str, *, raw: str | None = None, raw_until: int = 3 * HOUR, minute_until: int = 3 * DAY
) -> str:
    """One query that reads what the time range needs: raw readings up to ``raw_until``
    seconds wide (if given), readings_1m up to ``minute_until``, readings_1h beyond.

    ``rolled`` is a SELECT over ``{view}``, run on either rollup; ``{width}`` in it is the
    rollup's bucket in seconds. Each branch carries a condition on the range alone,
    which PostgreSQL folds before running the query, so only one branch reads anything;
    the branches must return the same columns.
    """

    def on(view: str, width: int) -> str:
        return rolled.replace("{view}", view).replace("{width}", str(width))

    lower = raw_until if raw is not None else 0
    branches = [(f"{RANGE} > {minute_until}", on("readings_1h", HOUR))]
    branches.append((f"{RANGE} > {lower} AND {RANGE} <= {minute_until}", on("readings_1m", 60)))
    if raw is not None:
        branches.append((f"{RANGE} <= {raw_until}", raw))
    parts = [_guarded(select, condition) for condition, select in branches]
    return "SELECT * FROM (\n" + "\nUNION ALL\n".join(parts) + "\n) q\nORDER BY 1"


def _guarded(select: str, condition: str) -> str:
    """``select`` read only when ``condition`` holds: PostgreSQL plans a constant false
    condition as a one-time filter that never runs the subquery under it."""
    return f"SELECT * FROM (\n{select.strip()}\n) b WHERE {condition}"


def timeseries_panel(
    title: str, sql: str, unit: str, *, description: str = "", height: int = 8, width: int = 12
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(Sql(sql, "time_series"))
        .unit(unit)
        .height(height)
        .span(width)
        .fill_opacity(10)
        .line_width(1)
        .show_points(common.VisibilityMode.NEVER)
    )


def stat_panel(
    title: str, sql: str, unit: str, *, description: str = "", width: int = 6
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(Sql(sql))
        .unit(unit)
        .height(4)
        .span(width)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def table_panel(
    title: str,
    sql: str,
    *,
    description: str = "",
    height: int = 8,
    width: int = 12,
    units: dict[str, str] | None = None,
    device_link: str | None = None,
) -> table.Panel:
    """A table; ``units`` maps column names to units, ``device_link`` names the column
    of device ids to link to the device dashboard."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(Sql(sql))
        .height(height)
        .span(width)
    )
    for column, unit in (units or {}).items():
        panel = panel.override_by_name(column, [model.DynamicConfigValue("unit", unit)])
    if device_link:
        link = {
            "title": "Device ${__value.raw}",
            "url": "/d/fleetline-device/device?var-device=${__value.raw}&${__url_time_range}",
        }
        panel = panel.override_by_name(device_link, [model.DynamicConfigValue("links", [link])])
    return panel


def query_variable(
    name: str, label: str, sql: str, *, multi: bool = False, include_all: bool = False
) -> dashboard.QueryVariable:
    """A variable filled by a query, refreshed when the dashboard loads; its first value
    is selected until the user picks one (nothing is saved as current)."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(sql)
        .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(include_all)
        .allow_custom_value(False)
    )


def new_dashboard(
    uid: str, title: str, description: str, time_from: str = "now-6h"
) -> dashboard.Dashboard:
    """A dashboard with the fleetline tag, linked to the other fleetline dashboards."""
    links = (
        dashboard.DashboardLink("fleetline")
        .type(model.DashboardLinkType.DASHBOARDS)
        .tags(TAGS)
        .as_dropdown(False)
        .include_vars(False)
        .keep_time(True)
    )
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time(time_from, "now")
        .refresh("30s")
        .timezone("browser")
        .readonly()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .link(links)
    )


class Units:
    """Grafana unit ids the dashboards use."""

    COUNT = "short"
    SECONDS = "s"
    DATE = "dateTimeAsIso"
    BYTES = "decbytes"
