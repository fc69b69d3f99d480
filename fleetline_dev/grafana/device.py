"""One device: its status, a graph per metric (raw readings up to a day, rollups
beyond), its latest values, alarms and dead letters."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from fleetline_dev.grafana import queries
from fleetline_dev.grafana.common import (
    Units,
    new_dashboard,
    query_variable,
    table_panel,
    timeseries_panel,
)


def build() -> Dashboard:
    return (
        new_dashboard(
            "fleetline-device",
            "fleetline: device",
            "One device: a graph per numeric metric, latest values, alarms and dead letters.",
        )
        .with_variable(query_variable("device", "Device", "SELECT device_id FROM device_status"))
        .with_variable(
            query_variable(
                "metric",
                "Metric",
                "SELECT metric FROM device_metrics"
                " WHERE device_id = ${device:sqlstring} AND last_value IS NOT NULL",
                multi=True,
                include_all=True,
            )
        )
        .with_panel(
            table_panel(
                "Status",
                """
SELECT CASE WHEN online THEN 'online' ELSE 'offline' END AS "status",
       last_seen AS "last seen", extract(epoch FROM now() - last_seen) AS "silent for",
       status_changed_at AS "since", tags::text AS "tags"
FROM device_status WHERE device_id = ${device:sqlstring}""",
                height=4,
                width=24,
                units={"silent for": Units.SECONDS, "last seen": Units.DATE, "since": Units.DATE},
            )
        )
        .with_panel(
            timeseries_panel(
                "$metric",
                queries.metric_stats(
                    "device_id = ${device:sqlstring} AND metric = ${metric:sqlstring}",
                    one_device=True,
                ),
                Units.COUNT,
                description="Average, lowest and highest value per interval.",
            )
            .repeat("metric")
            .repeat_direction("h")
            .max_per_row(2)
        )
        .with_panel(
            table_panel(
                "Latest values",
                """
SELECT metric, coalesce(last_value::text, last_text) AS "value", last_time AS "at"
FROM device_metrics WHERE device_id = ${device:sqlstring} ORDER BY metric""",
                units={"at": Units.DATE},
            )
        )
        .with_panel(
            table_panel(
                "Alarms",
                """
SELECT raised_at AS "raised", severity, rule_name AS "rule", metric, state, value, peak,
       extract(epoch FROM coalesce(cleared_at, now()) - raised_at) AS "open for", message
FROM alarms WHERE device_id = ${device:sqlstring} ORDER BY id DESC LIMIT 50""",
                units={"open for": Units.SECONDS, "raised": Units.DATE},
            )
        )
        .with_panel(
            table_panel(
                "Dead letters",
                """
SELECT received_at AS "received", topic, reason, length(payload) AS "size"
FROM dead_letters
WHERE device_id = ${device:sqlstring} AND $__timeFilter(received_at)
ORDER BY received_at DESC LIMIT 100""",
                width=24,
                units={"size": Units.BYTES, "received": Units.DATE},
            )
        )
    )
