"""Telemetry (routes/telemetry.py): raw points, time buckets from raw rows or the rollups,
the latest values; and the rollups' retentions read at start-up (app.py)."""

from __future__ import annotations

# A retention setting's text as an interval, as PostgreSQL reads it.
INTERVAL = "SELECT $1::text::interval"

LATEST = """
SELECT s.metric, l.ts, l.value, l.value_text
FROM series s JOIN series_latest l ON l.series_id = s.id
WHERE s.device_id = $1
"""
# $1 device, $2 metrics (NULL: all), [$3, $4) the range, ($5, $6) the page after this
# time and series (NULL: the first page), $7 limit + 1.
POINTS = """
SELECT t.ts, s.metric, t.value, t.value_text, s.id AS sid
FROM series s JOIN telemetry t ON t.series_id = s.id
WHERE s.device_id = $1 AND ($2::text[] IS NULL OR s.metric = ANY($2))
  AND t.ts >= $3 AND t.ts < $4
  AND ($5::timestamptz IS NULL OR (t.ts >= $5 AND (t.ts, s.id) > ($5, $6)))
ORDER BY t.ts, s.id
LIMIT $7
"""
COUNT_SERIES = (
    "SELECT count(*) FROM series WHERE device_id = $1 AND ($2::text[] IS NULL OR metric = ANY($2))"
)

_NUMERIC = "FILTER (WHERE t.value IS NOT NULL)"
AGG_SQL: dict[str, str] = {
    # count is every reading in the bucket (text values too); the others numeric only.
    "count": "count(*)",
    "avg": f"avg(t.value) {_NUMERIC}",
    "min": f"min(t.value) {_NUMERIC}",
    "max": f"max(t.value) {_NUMERIC}",
    "last": f"(array_agg(t.value ORDER BY t.ts DESC) {_NUMERIC})[1]",
}


def buckets_from_raw(aggs: list[str]) -> str:
    """Buckets of raw rows with the aggregates ``aggs`` (keys of AGG_SQL): $1 device, $2
    metrics (NULL: all), [$3, $4) the range, $5 the bucket width, $6 the buckets' origin."""
    columns = ", ".join(f"{AGG_SQL[a]} AS {a}" for a in aggs)
    return f"""
SELECT date_bin($5::interval, t.ts, $6) AS bucket, s.metric, {columns}
FROM series s JOIN telemetry t ON t.series_id = s.id
WHERE s.device_id = $1 AND ($2::text[] IS NULL OR s.metric = ANY($2))
  AND t.ts >= $3 AND t.ts < $4
GROUP BY 1, 2 ORDER BY 1, 2
"""


# Rollup rows in range (kept current as readings are written: migrations/0022), then the
# same buckets and aggregates as from raw rows. As buckets_from_raw.
# The device's series ids are found first (an InitPlan) and the rollup is filtered by
# them rather than joined: on TimescaleDB a rollup is a continuous aggregate (a union of
# its materialized rows and real-time rows), into which a join does not push the series,
# so a join read every series of the range (46.7 ms for one device of 1,000 over 30
# days, bench/storage.py); filtered, each part reads the device's rows by index.
FROM_ROLLUPS = """
SELECT date_bin($5::interval, r.bucket, $6) AS bucket, s.metric,
       sum(r.count)::bigint AS count,
       sum(r.sum) / nullif(sum(r.value_count), 0) AS avg,
       min(r.min) AS min, max(r.max) AS max,
       (array_agg(r.last ORDER BY r.bucket DESC) FILTER (WHERE r.last IS NOT NULL))[1] AS last
FROM {table} r JOIN series s ON s.id = r.series_id
WHERE r.series_id = ANY(ARRAY(
        SELECT id FROM series
        WHERE device_id = $1::text AND ($2::text[] IS NULL OR metric = ANY($2))))
  AND r.bucket >= $3 AND r.bucket < $4
GROUP BY 1, 2 ORDER BY 1, 2
"""


def buckets_from_rollup(table: str) -> str:
    """FROM_ROLLUPS over the rollup ``table`` (telemetry_1m, telemetry_1h)."""
    return FROM_ROLLUPS.format(table=table)


def fleet_latest(conditions: str) -> str:
    """The last value of metric $1 on every device that has it, by device id:
    ``conditions`` on devices ``d`` (and activity ``a``) with parameters $2 to $4
    (queries.devices.device_conditions), $5 limit + 1."""
    return f"""
SELECT d.id AS device_id, l.ts, l.value, l.value_text
FROM devices d
JOIN series s ON s.device_id = d.id AND s.metric = $1
JOIN series_latest l ON l.series_id = s.id
LEFT JOIN device_activity a ON a.device_id = d.id
WHERE {conditions}
ORDER BY d.id
LIMIT $5
"""
