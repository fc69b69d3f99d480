"""Ingest health, from what is stored: readings and devices reporting per interval,
dead letters by reason and device, devices over their limits. The services' own
metrics (lag, batch sizes, acknowledgements) are in Prometheus (deploy/prometheus)."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from fleetline_dev.grafana import queries
from fleetline_dev.grafana.common import (
    Units,
    new_dashboard,
    stat_panel,
    table_panel,
    timeseries_panel,
)


def build() -> Dashboard:
    return (
        new_dashboard(
            "fleetline-ingest",
            "fleetline: ingest",
            "What ingest stored and refused: readings and devices reporting per "
            "interval, dead letters, devices over their limits.",
        )
        .with_panel(
            stat_panel(
                "Devices reporting",
                """
SELECT count(*) FILTER (WHERE last_seen > now() - interval '5 minutes') AS "reporting",
       count(*) FILTER (WHERE last_seen IS NULL OR last_seen <= now() - interval '5 minutes')
       AS "silent"
FROM device_status""",
                Units.COUNT,
                width=8,
                description="Seen in the last 5 minutes, and not.",
            )
        )
        .with_panel(
            stat_panel(
                "Dead letters",
                queries.DEAD_LETTERS_COUNT,
                Units.COUNT,
                width=8,
            )
        )
        .with_panel(
            stat_panel(
                "Devices over their limits",
                """
SELECT count(*) AS "devices" FROM limit_refusals WHERE $__timeFilter(last_refused_at)""",
                Units.COUNT,
                width=8,
                description="Refused by the broker in the time range.",
            )
        )
        .with_panel(
            timeseries_panel("Readings stored per second", queries.READINGS_PER_SECOND, Units.COUNT)
        )
        .with_panel(timeseries_panel("Devices reporting", queries.DEVICES_REPORTING, Units.COUNT))
        .with_panel(
            timeseries_panel("Dead letters by reason", queries.DEAD_LETTERS_OVER_TIME, Units.COUNT)
        )
        .with_panel(
            table_panel(
                "Dead letters by device",
                queries.DEAD_LETTERS_BY_DEVICE,
                units={"last": Units.DATE},
                device_link="device",
            )
        )
        .with_panel(
            table_panel(
                "Devices over their limits",
                """
SELECT device_id AS "device", messages AS "messages refused", bytes AS "bytes refused",
       first_refused_at AS "first", last_refused_at AS "last"
FROM limit_refusals WHERE $__timeFilter(last_refused_at)
ORDER BY last_refused_at DESC LIMIT 100""",
                width=24,
                units={"bytes refused": Units.BYTES, "first": Units.DATE, "last": Units.DATE},
                device_link="device",
            )
        )
        .with_panel(
            table_panel(
                "Recent dead letters",
                queries.RECENT_DEAD_LETTERS,
                width=24,
                height=10,
                units={"size": Units.BYTES, "received": Units.DATE},
            )
        )
    )
