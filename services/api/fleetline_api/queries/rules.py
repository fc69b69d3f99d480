"""Rules (routes/rules.py): CRUD, clearing a rule's open alarms, and the backtest's
readings."""

from __future__ import annotations

COLUMNS = """
id, name, kind, match, metric, raise_condition, clear_condition, timeout_s, severity, message,
actions, enabled, version, created_at, updated_at
"""
# $1 the cursor, $2 limit + 1.
LIST_RULES = (
    f"SELECT {COLUMNS} FROM rules WHERE ($1::bigint IS NULL OR id > $1) ORDER BY id LIMIT $2"
)
SELECT_RULE = f"SELECT {COLUMNS} FROM rules WHERE id = $1"
INSERT_RULE = f"""
INSERT INTO rules (name, match, kind, metric, raise_condition, clear_condition, timeout_s,
                   severity, message, actions, enabled)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
RETURNING {COLUMNS}
"""
# The stored actions (their secrets), the row locked for the UPDATE that follows.
LOCK_ACTIONS = "SELECT actions FROM rules WHERE id = $1 FOR UPDATE"
UPDATE_RULE = f"""
UPDATE rules SET name = $2, match = $3, kind = $4, metric = $5, raise_condition = $6,
       clear_condition = $7, timeout_s = $8, severity = $9, message = $10, actions = $11,
       enabled = $12, version = version + 1, updated_at = now()
WHERE id = $1
RETURNING {COLUMNS}
"""
# A changed rule's timers restart.
DELETE_STATE = "DELETE FROM rule_state WHERE rule_id = $1"
DELETE_RULE = "DELETE FROM rules WHERE id = $1"
# Open alarms of a rule that is going away or being disabled.
CLEAR_OPEN = """
WITH cleared AS (
    UPDATE rule_alarms SET state = 'cleared', cleared_at = now(), cleared_by = $2,
           updated_at = now()
    WHERE rule_id = $1 AND state <> 'cleared'
    RETURNING *
), history AS (
    INSERT INTO alarm_events (alarm_id, at, event, actor, value)
    SELECT id, cleared_at, 'cleared', $2, value FROM cleared
)
SELECT id, rule_id, rule_name, device_id, metric, severity, state, raised_at, acknowledged_at,
       acknowledged_by, cleared_at, cleared_by, value, peak, count, message, updated_at
FROM cleared
"""

# The backtest's readings: $1 metric, $2 device ids, $3 tags (none of either: every
# device), [$4, $5) the range, $6 the most readings + 1.
BACKTEST_THRESHOLD = """
SELECT r.device_id, r.time, r.value
FROM readings r LEFT JOIN devices d ON d.id = r.device_id
WHERE r.metric = $1 AND r.time >= $4 AND r.time < $5 AND r.value IS NOT NULL
  AND ((cardinality($2::text[]) = 0 AND $3::jsonb = '{}'::jsonb)
       OR r.device_id = ANY($2::text[])
       OR ($3::jsonb <> '{}'::jsonb AND d.tags @> $3::jsonb))
ORDER BY r.device_id, r.time
LIMIT $6
"""
# no_data rules: every reading is a sign of life, whatever its metric.
BACKTEST_NO_DATA = """
SELECT DISTINCT r.device_id, r.time, NULL::float8 AS value
FROM readings r LEFT JOIN devices d ON d.id = r.device_id
WHERE r.time >= $3 AND r.time < $4
  AND ((cardinality($1::text[]) = 0 AND $2::jsonb = '{}'::jsonb)
       OR r.device_id = ANY($1::text[])
       OR ($2::jsonb <> '{}'::jsonb AND d.tags @> $2::jsonb))
ORDER BY r.device_id, r.time
LIMIT $5
"""
