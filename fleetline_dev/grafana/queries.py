"""SQL more than one dashboard shows. Every query reads only the stable views of
docs/grafana.md (what the role fleetline_reader may read), with Grafana's macros."""

from __future__ import annotations

from fleetline_dev.grafana.common import DAY, by_range

# Readings stored per second, over the whole fleet: from the rollups only (the raw
# readings of a fleet are too many to count on every refresh). A rate, not a count per
# interval, so the graph keeps its scale where it moves from minute to hourly rollups:
# an interval narrower than a rollup's bucket holds one bucket.
READINGS_PER_SECOND = by_range(
    """SELECT $__timeGroupAlias(bucket, $__interval),
       sum(count) / greatest($__interval_ms / 1000.0, {width}) AS "readings/s"
FROM {view} WHERE $__timeFilter(bucket) GROUP BY 1""",
    minute_until=2 * DAY,
)

# Readings stored in the time range, from the rollups.
READINGS_STORED = by_range(
    """SELECT sum(count)::bigint AS "readings" FROM {view} WHERE $__timeFilter(bucket)""",
    minute_until=2 * DAY,
)

DEVICES_REPORTING = by_range(
    """SELECT $__timeGroupAlias(bucket, $__interval),
       count(DISTINCT device_id)::bigint AS "devices"
FROM {view} WHERE $__timeFilter(bucket) GROUP BY 1""",
    minute_until=2 * DAY,
)

# A dead letter's reason without its numbers and details, to group by.
REASON = "regexp_replace(split_part(reason, ':', 1), '[0-9]+', 'N', 'g')"

DEAD_LETTERS_COUNT = """
SELECT count(*) AS "dead letters" FROM dead_letters WHERE $__timeFilter(received_at)
"""

DEAD_LETTERS_OVER_TIME = f"""
SELECT $__timeGroupAlias(received_at, $__interval), {REASON} AS metric, count(*) AS value
FROM dead_letters WHERE $__timeFilter(received_at)
GROUP BY 1, 2 ORDER BY 1, 2
"""

DEAD_LETTERS_BY_DEVICE = """
SELECT coalesce(device_id, '(none)') AS "device", count(*) AS "dead letters",
       max(received_at) AS "last"
FROM dead_letters WHERE $__timeFilter(received_at)
GROUP BY 1 ORDER BY 2 DESC LIMIT 20
"""

RECENT_DEAD_LETTERS = """
SELECT received_at AS "received", device_id AS "device", topic, reason,
       length(payload) AS "size",
       encode(substring(payload FROM 1 FOR 200), 'escape') AS "payload (start)"
FROM dead_letters WHERE $__timeFilter(received_at)
ORDER BY received_at DESC LIMIT 100
"""


def metric_stats(where: str, *, one_device: bool) -> str:
    """avg, min and max of the numeric readings matching ``where`` (on device_id and
    metric) per interval. For one device: raw readings up to a day, minute rollups up to
    a week, hourly ones beyond, the rollups filtered by the device's series ids (found
    first in device_metrics: docs/grafana.md). For the fleet: minute rollups up to two
    days, hourly ones beyond."""
    series = f"series_id = ANY(ARRAY(SELECT series_id FROM device_metrics WHERE {where}))"
    rolled = f"""SELECT $__timeGroupAlias(bucket, $__interval),
       sum(sum) / nullif(sum(value_count), 0) AS "avg", min(min) AS "min", max(max) AS "max"
FROM {{view}} WHERE $__timeFilter(bucket) AND {series if one_device else where}
  AND value_count > 0 GROUP BY 1"""
    if not one_device:
        return by_range(rolled, minute_until=2 * DAY)
    raw = f"""SELECT $__timeGroupAlias(time, $__interval),
       avg(value) AS "avg", min(value) AS "min", max(value) AS "max"
FROM readings WHERE $__timeFilter(time) AND {where} AND value IS NOT NULL GROUP BY 1"""
    return by_range(rolled, raw=raw, raw_until=DAY, minute_until=7 * DAY)
