"""Alarms: what is open now, what was raised in the time range, and which rules raise
the most."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import CustomVariable, Dashboard

from fleetline.rules_engine import SEVERITIES
from fleetline_dev.grafana.common import (
    Units,
    new_dashboard,
    stat_panel,
    table_panel,
    timeseries_panel,
)

IN_SEVERITY = "severity IN (${severity:sqlstring})"


def build() -> Dashboard:
    severity = (
        CustomVariable("severity")
        .label("Severity")
        .values(",".join(SEVERITIES))
        .multi(True)
        .include_all(True)
    )
    return (
        new_dashboard(
            "fleetline-alarms",
            "fleetline: alarms",
            "Open alarms, alarms raised in the time range, and the rules that raise the most.",
            time_from="now-7d",
        )
        .with_variable(severity)
        .with_panel(
            stat_panel(
                "Active",
                f"""
SELECT count(*) AS "active" FROM alarms WHERE state = 'active' AND {IN_SEVERITY}""",
                Units.COUNT,
            )
        )
        .with_panel(
            stat_panel(
                "Acknowledged",
                f"""
SELECT count(*) AS "acknowledged" FROM alarms
WHERE state = 'acknowledged' AND {IN_SEVERITY}""",
                Units.COUNT,
            )
        )
        .with_panel(
            stat_panel(
                "Raised",
                f"""
SELECT count(*) AS "raised" FROM alarms WHERE $__timeFilter(raised_at) AND {IN_SEVERITY}""",
                Units.COUNT,
                description="In the time range.",
            )
        )
        .with_panel(
            stat_panel(
                "Median time to clear",
                f"""
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM cleared_at - raised_at))
       AS "median"
FROM alarms WHERE state = 'cleared' AND $__timeFilter(raised_at) AND {IN_SEVERITY}""",
                Units.SECONDS,
                description="Of the alarms raised in the time range that have cleared.",
            )
        )
        .with_panel(
            table_panel(
                "Open alarms",
                f"""
SELECT raised_at AS "raised", severity, device_id AS "device", rule_name AS "rule", metric,
       state, value, peak, count AS "readings",
       extract(epoch FROM now() - raised_at) AS "open for", message
FROM alarms WHERE state <> 'cleared' AND {IN_SEVERITY}
ORDER BY raised_at DESC LIMIT 500""",
                width=24,
                height=10,
                units={"open for": Units.SECONDS, "raised": Units.DATE},
                device_link="device",
            )
        )
        .with_panel(
            timeseries_panel(
                "Alarms raised",
                f"""
SELECT $__timeGroupAlias(raised_at, $__interval), severity AS metric, count(*) AS value
FROM alarms WHERE $__timeFilter(raised_at) AND {IN_SEVERITY}
GROUP BY 1, 2 ORDER BY 1, 2""",
                Units.COUNT,
            )
        )
        .with_panel(
            table_panel(
                "Rules raising the most",
                f"""
SELECT rule_name AS "rule", count(*) AS "alarms", count(DISTINCT device_id) AS "devices",
       max(raised_at) AS "last"
FROM alarms WHERE $__timeFilter(raised_at) AND {IN_SEVERITY}
GROUP BY 1 ORDER BY 2 DESC LIMIT 20""",
                units={"last": Units.DATE},
            )
        )
        .with_panel(
            table_panel(
                "Alarms in the time range",
                f"""
SELECT raised_at AS "raised", severity, device_id AS "device", rule_name AS "rule", state,
       peak, extract(epoch FROM coalesce(cleared_at, now()) - raised_at) AS "duration",
       acknowledged_by AS "acknowledged by", cleared_by AS "cleared by"
FROM alarms WHERE $__timeFilter(raised_at) AND {IN_SEVERITY}
ORDER BY raised_at DESC LIMIT 500""",
                width=24,
                height=10,
                units={"duration": Units.SECONDS, "raised": Units.DATE},
                device_link="device",
            )
        )
    )
