"""Device and module twins as the API shows them (routes/twins.py); the patches and
publishes of desired properties are queries/commands.py."""

from __future__ import annotations

# $1 device, $2 module ('': the device's own twin); no row when either is not registered.
SELECT_TWIN = """
SELECT d.id AS device_id, nullif($2::text, '') AS module_id, d.tags,
       coalesce(td.desired, '{}'::jsonb) AS desired,
       coalesce(td.version, 0) AS desired_version,
       td.updated_at AS desired_updated_at,
       coalesce(td.published_version, 0) AS desired_published_version,
       coalesce(tr.reported, '{}'::jsonb) AS reported,
       coalesce(tr.version, 0) AS reported_version,
       tr.updated_at AS reported_updated_at
FROM devices d
LEFT JOIN twin_desired td ON td.device_id = d.id AND td.module_id = $2
LEFT JOIN twin_reported tr ON tr.device_id = d.id AND tr.module_id = $2
WHERE d.id = $1 AND ($2 = '' OR EXISTS (
    SELECT 1 FROM device_modules m WHERE m.device_id = d.id AND m.module_id = $2
))
"""
