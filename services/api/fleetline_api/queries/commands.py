"""Commands to devices (commands.py): the checks of a direct method call, and the patch
and publish of a twin's desired properties."""

from __future__ import annotations

# --- direct methods ---------------------------------------------------------------

# The device's status, and whether the module ('' : the device itself) is registered.
DEVICE_ONLINE = """
SELECT a.online,
       $2::text = '' OR EXISTS (
           SELECT 1 FROM device_modules m WHERE m.device_id = d.id AND m.module_id = $2
       ) AS module_exists
FROM devices d LEFT JOIN device_activity a ON a.device_id = d.id
WHERE d.id = $1
"""
# Taken before a module's twin row is written: its deletion (whose trigger removes the
# module's twin rows) waits for the transaction, so no twin row outlives its module.
LOCK_MODULE = """
SELECT 1 FROM device_modules WHERE device_id = $1 AND module_id = $2 FOR KEY SHARE
"""

# --- desired properties -------------------------------------------------------------

# A row to lock, version 0, for a registered device that has none yet.
# A twin is (device_id, module_id): module_id '' is the device's own twin.
ENSURE_DESIRED = """
INSERT INTO twin_desired (device_id, module_id) SELECT id, $2 FROM devices WHERE id = $1
ON CONFLICT (device_id, module_id) DO NOTHING
"""
LOCK_DESIRED = """
SELECT version FROM twin_desired WHERE device_id = $1 AND module_id = $2 FOR UPDATE
"""
# Versions move only when the document changes: a patch that changes nothing (such as
# {}) keeps the version and only publishes again.
APPLY_DESIRED = """
WITH merged AS (
    SELECT desired AS old, fleetline_merge_patch(desired, $3::jsonb) AS new
    FROM twin_desired WHERE device_id = $1 AND module_id = $2
)
UPDATE twin_desired t
SET desired = m.new, version = t.version + 1, updated_at = now()
FROM merged m
WHERE t.device_id = $1 AND t.module_id = $2 AND m.new IS DISTINCT FROM m.old
  AND octet_length(m.new::text) <= $4
RETURNING t.version
"""
DESIRED_SIZE = """
SELECT octet_length(fleetline_merge_patch(desired, $3::jsonb)::text)
FROM twin_desired WHERE device_id = $1 AND module_id = $2
"""
LOCK_FOR_PUBLISH = """
SELECT desired, version FROM twin_desired WHERE device_id = $1 AND module_id = $2 FOR UPDATE
"""
MARK_PUBLISHED = """
UPDATE twin_desired SET published_version = $3 WHERE device_id = $1 AND module_id = $2
"""
