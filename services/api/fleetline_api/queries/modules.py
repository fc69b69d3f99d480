"""The registry of a device's modules (routes/modules.py)."""

from __future__ import annotations

LIST_MODULES = (
    "SELECT device_id, module_id, created_at FROM device_modules "
    "WHERE device_id = $1 ORDER BY module_id"
)
SELECT_MODULE = """
SELECT device_id, module_id, created_at FROM device_modules
WHERE device_id = $1 AND module_id = $2
"""
COUNT_MODULES = "SELECT count(*) FROM device_modules WHERE device_id = $1"
CREATE_MODULE = """
INSERT INTO device_modules (device_id, module_id) VALUES ($1, $2)
RETURNING device_id, module_id, created_at
"""
DELETE_MODULE = "DELETE FROM device_modules WHERE device_id = $1 AND module_id = $2"
