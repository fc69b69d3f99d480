"""SQL of routes/firmware.py."""

COLUMNS = """
f.id, f.version, f.target, f.kind, f.notes, b.size, b.sha256, b.received,
CASE WHEN f.manifest IS NULL THEN 'uploading' ELSE 'released' END AS status,
f.manifest, f.signature, f.created_at, f.released_at
"""

INSERT_FIRMWARE = """
INSERT INTO firmware (version, target, kind, notes, blob_id) VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""

GET_FIRMWARE = f"SELECT {COLUMNS} FROM firmware f JOIN blobs b ON b.id = f.blob_id WHERE f.id = $1"

LIST_FIRMWARE = f"""
SELECT {COLUMNS} FROM firmware f JOIN blobs b ON b.id = f.blob_id
WHERE ($1::text IS NULL OR f.target = $1) ORDER BY f.id DESC LIMIT $2
"""

GET_CONTENT = f"""
SELECT {COLUMNS}, f.blob_id FROM firmware f JOIN blobs b ON b.id = f.blob_id WHERE f.id = $1
"""

# The release being uploaded, locked while a part is added.
LOCK_FIRMWARE = "SELECT blob_id, version, target, kind FROM firmware WHERE id = $1 FOR UPDATE"

RELEASE = """
UPDATE firmware SET manifest = $2, signature = $3, released_at = now() WHERE id = $1
"""

DELETE_FIRMWARE = "DELETE FROM firmware WHERE id = $1 RETURNING blob_id"
# A rollout of the release that has not finished (rollouts lock the release FOR SHARE
# while they are created: queries/jobs.py).
UNFINISHED_ROLLOUT = """
SELECT id FROM jobs
WHERE type = 'rollout' AND finished_at IS NULL AND (spec ->> 'firmware_id')::bigint = $1
LIMIT 1
"""
