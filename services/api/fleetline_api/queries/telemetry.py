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


# Rollup rows in range, except the hours still pending, plus those hours from raw rows;
# then the same buckets and aggregates as from raw rows. As buckets_from_raw, and $7 the
# rollup's granularity.
FROM_ROLLUPS = """
WITH chosen AS (
    SELECT id, metric FROM series
    WHERE device_id = $1 AND ($2::text[] IS NULL OR metric = ANY($2))
),
pending AS (  -- hours holding a minute whose rollup is behind its raw rows
    SELECT DISTINCT p.series_id, date_bin(INTERVAL '1 hour', p.minute, $6) AS hour
    FROM rollup_pending p JOIN chosen c ON c.id = p.series_id
    WHERE p.minute >= $3::timestamptz - INTERVAL '1 hour' AND p.minute < $4::timestamptz
),
parts AS (
    SELECT r.series_id, r.bucket, r.count, r.value_count, r.sum, r.min, r.max, r.last
    FROM {table} r JOIN chosen c ON c.id = r.series_id
    WHERE r.bucket >= $3 AND r.bucket < $4
      AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.series_id = r.series_id
                      AND p.hour = date_bin(INTERVAL '1 hour', r.bucket, $6))
    UNION ALL
    SELECT t.series_id, date_bin($7::interval, t.ts, $6), count(*), count(t.value),
           sum(t.value), min(t.value), max(t.value),
           (array_agg(t.value ORDER BY t.ts DESC) FILTER (WHERE t.value IS NOT NULL))[1]
    FROM telemetry t
    JOIN pending p ON t.series_id = p.series_id
                  AND t.ts >= p.hour AND t.ts < p.hour + INTERVAL '1 hour'
    WHERE t.ts >= $3 AND t.ts < $4
    GROUP BY 1, 2
)
SELECT date_bin($5::interval, x.bucket, $6) AS bucket, c.metric,
       sum(x.count)::bigint AS count,
       sum(x.sum) / nullif(sum(x.value_count), 0) AS avg,
       min(x.min) AS min, max(x.max) AS max,
       (array_agg(x.last ORDER BY x.bucket DESC) FILTER (WHERE x.last IS NOT NULL))[1] AS last
FROM parts x JOIN chosen c ON c.id = x.series_id
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
