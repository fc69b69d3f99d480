"""The fleet overview: how many devices are online, what they send, open alarms, and
one metric across the fleet."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row

from fleetline_dev.grafana import queries
from fleetline_dev.grafana.common import (
    Units,
    new_dashboard,
    query_variable,
    stat_panel,
    table_panel,
    timeseries_panel,
)


def build() -> Dashboard:
    return (
        new_dashboard(
            "fleetline-fleet",
            "fleetline: fleet",
            "Devices online, readings stored, open alarms and one metric across "
            "the fleet. Wide ranges read the hourly rollups.",
        )
        .with_variable(
            query_variable(
                "metric",
                "Metric",
                "SELECT DISTINCT metric FROM device_metrics WHERE last_value IS NOT NULL",
            )
        )
        .with_panel(
            stat_panel(
                "Devices online",
                """
SELECT count(*) FILTER (WHERE online) AS "online",
       count(*) FILTER (WHERE NOT online) AS "offline"
FROM device_status""",
                Units.COUNT,
            )
        )
        .with_panel(
            stat_panel(
                "Open alarms",
                """
SELECT count(*) FILTER (WHERE state = 'active') AS "active",
       count(*) FILTER (WHERE state = 'acknowledged') AS "acknowledged"
FROM alarms WHERE state <> 'cleared'""",
                Units.COUNT,
            )
        )
        .with_panel(
            stat_panel(
                "Readings stored",
                f"""
SELECT coalesce(sum(readings), 0)::bigint AS "readings" FROM ({queries.READINGS_STORED}) r""",
                Units.COUNT,
                description="In the time range, from the rollups.",
            )
        )
        .with_panel(
            stat_panel(
                "Dead letters",
                queries.DEAD_LETTERS_COUNT,
                Units.COUNT,
            )
        )
        .with_panel(
            timeseries_panel("Readings stored per second", queries.READINGS_PER_SECOND, Units.COUNT)
        )
        .with_panel(
            timeseries_panel(
                "$metric across the fleet",
                queries.metric_stats("metric = ${metric:sqlstring}", one_device=False),
                Units.COUNT,
                description="Average, lowest and highest value of every device per interval.",
            )
        )
        .with_row(Row("Devices"))
        .with_panel(
            table_panel(
                "Devices",
                """
SELECT device_id AS "device", CASE WHEN online THEN 'online' ELSE 'offline' END AS "status",
       last_seen AS "last seen", extract(epoch FROM now() - last_seen) AS "silent for",
       tags::text AS "tags"
FROM device_status
ORDER BY online, last_seen DESC NULLS LAST LIMIT 1000""",
                height=10,
                units={"silent for": Units.SECONDS, "last seen": Units.DATE},
                device_link="device",
            )
        )
        .with_panel(
            table_panel(
                "Latest $metric",
                """
SELECT device_id AS "device", last_value AS "value", last_time AS "at",
       extract(epoch FROM now() - last_time) AS "age"
FROM device_metrics WHERE metric = ${metric:sqlstring}
ORDER BY last_time DESC NULLS LAST LIMIT 1000""",
                height=10,
                units={"age": Units.SECONDS, "at": Units.DATE},
                device_link="device",
            )
        )
    )
