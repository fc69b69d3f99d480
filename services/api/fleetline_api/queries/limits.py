"""Per-device limits (routes/limits.py)."""

_COLUMNS = """
selector, messages_per_second, burst_messages, bytes_per_second, burst_bytes, updated_at
"""
LIST_LIMITS = f"""
SELECT {_COLUMNS} FROM device_limits
ORDER BY selector <> 'default', device_id IS NULL, selector
"""
PUT_LIMITS = f"""
INSERT INTO device_limits (selector, device_id, tag_name, tag_value, messages_per_second,
                           burst_messages, bytes_per_second, burst_bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (selector) DO UPDATE
SET messages_per_second = EXCLUDED.messages_per_second,
    burst_messages = EXCLUDED.burst_messages, bytes_per_second = EXCLUDED.bytes_per_second,
    burst_bytes = EXCLUDED.burst_bytes, updated_at = now()
RETURNING {_COLUMNS}
"""
DELETE_LIMITS = "DELETE FROM device_limits WHERE selector = $1 AND selector <> 'default'"
LIMITS_OF = f"""
SELECT {_COLUMNS} FROM fleetline_limits_of($1, (SELECT tags FROM devices WHERE id = $1))
"""
REFUSALS_OF = """
SELECT messages, bytes, first_refused_at, last_refused_at
FROM device_limit_refusals WHERE device_id = $1
"""
