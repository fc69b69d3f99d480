"""SQL of files uploaded by devices (transfers.py, routes/transfers.py, routes/files.py)."""

COLUMNS = """
f.id, f.device_id, f.name, f.content_type, f.state, b.size, b.sha256, b.received,
f.created_at, f.completed_at, f.expires_at
"""
# The device's file of that name, locked.
LOCK_BY_NAME = f"""
SELECT {COLUMNS}, f.blob_id FROM device_files f JOIN blobs b ON b.id = f.blob_id
WHERE f.device_id = $1 AND f.name = $2
FOR UPDATE OF f
"""
# Bytes the device keeps (its unfinished uploads count whole).
USED = """
SELECT coalesce(sum(b.size), 0)::bigint FROM device_files f JOIN blobs b ON b.id = f.blob_id
WHERE f.device_id = $1
"""
# Serialises one device's upload requests (the quota is checked and taken at once).
LOCK_DEVICE = "SELECT 1 FROM devices WHERE id = $1 FOR UPDATE"
INSERT = """
INSERT INTO device_files (device_id, name, content_type, blob_id, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
RETURNING id
"""
EXTEND = "UPDATE device_files SET expires_at = now() + make_interval(secs => $2) WHERE id = $1"
DELETE = "DELETE FROM device_files WHERE id = $1"
# The file a grant names, locked while a part is added.
LOCK = f"""
SELECT {COLUMNS}, f.blob_id FROM device_files f JOIN blobs b ON b.id = f.blob_id
WHERE f.id = $1
FOR UPDATE OF f
"""
# When the last part's hash has been checked, just before the commit (not the start of
# the transaction, which may have waited for the row): routes of files read files in
# this order a few seconds later (fleetline_rules/routing.py).
COMPLETE = """
UPDATE device_files SET state = 'complete', completed_at = clock_timestamp(), expires_at = NULL
WHERE id = $1
RETURNING completed_at
"""
GET = f"""
SELECT {COLUMNS}, f.blob_id FROM device_files f JOIN blobs b ON b.id = f.blob_id
WHERE f.device_id = $1 AND f.id = $2
"""
# $2 state (NULL: any), $3 cursor (an id), $4 limit + 1; newest first.
LIST = f"""
SELECT {COLUMNS} FROM device_files f JOIN blobs b ON b.id = f.blob_id
WHERE f.device_id = $1 AND ($2::text IS NULL OR f.state = $2)
  AND ($3::bigint IS NULL OR f.id < $3)
ORDER BY f.id DESC LIMIT $4
"""
DELETE_FILE = "DELETE FROM device_files WHERE device_id = $1 AND id = $2 RETURNING id"
# Unfinished uploads past their expiry, at most $1 at a time (their blobs go by trigger).
EXPIRED = """
DELETE FROM device_files WHERE id IN (
    SELECT id FROM device_files WHERE state = 'uploading' AND expires_at < now()
    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
"""
