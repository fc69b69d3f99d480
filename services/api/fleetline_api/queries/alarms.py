"""Alarms (routes/alarms.py): reading them, and a person's moves (acknowledge, clear)."""

from __future__ import annotations

COLUMNS = """
id, rule_id, rule_name, device_id, metric, severity, state, raised_at, acknowledged_at,
acknowledged_by, cleared_at, cleared_by, value, peak, count, message, updated_at
"""
# $1 state, $2 device, $3 rule, $4 severity (each NULL: any), $5 the cursor, $6 limit + 1.
LIST_ALARMS = f"""
SELECT {COLUMNS} FROM rule_alarms
WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR device_id = $2)
  AND ($3::bigint IS NULL OR rule_id = $3) AND ($4::text IS NULL OR severity = $4)
  AND ($5::bigint IS NULL OR id < $5)
ORDER BY id DESC
LIMIT $6
"""
SELECT_ALARM = f"SELECT {COLUMNS} FROM rule_alarms WHERE id = $1"
# The moves: $1 the alarm, $2 who; no row when its state does not allow the move.
ACK = f"""
UPDATE rule_alarms SET state = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2,
       updated_at = now()
WHERE id = $1 AND state = 'active'
RETURNING {COLUMNS}
"""
CLEAR = f"""
UPDATE rule_alarms SET state = 'cleared', cleared_at = now(), cleared_by = $2, updated_at = now()
WHERE id = $1 AND state IN ('active', 'acknowledged')
RETURNING {COLUMNS}
"""
# A move recorded in the alarm's history.
RECORD_HISTORY = (
    "INSERT INTO alarm_events (alarm_id, at, event, actor, value) VALUES ($1, $2, $3, $4, $5)"
)
ALARM_HISTORY = "SELECT at, event, actor, value FROM alarm_events WHERE alarm_id = $1 ORDER BY id"
ALARM_DELIVERIES = """
SELECT id, event, action_index, action_type, action, target, status, attempts,
       next_attempt_at, last_error, response_status, created_at, delivered_at
FROM action_deliveries WHERE alarm_id = $1 ORDER BY id
"""
