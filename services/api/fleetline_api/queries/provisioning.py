"""Self-provisioning (provisioning.py) and enrollments (routes/enrollments.py)."""

# The enrollment, and whether the registration id ($2) matches its whole pattern.
_ENROLLMENT = """
SELECT id, kind, attestation, key_version, ca_name, thumbprint, initial_tags,
       initial_desired, reprovision, enabled,
       $2 ~ ('^(?:' || registration_pattern || ')$') AS allowed
FROM enrollments WHERE id = $1
"""
ENROLLMENT_FOR = _ENROLLMENT
# Registrations of one enrollment take turns with its changes (FOR SHARE: not with each
# other).
LOCK_ENROLLMENT = _ENROLLMENT + " FOR SHARE"
LOCK_DEVICE = "SELECT enrollment_id FROM devices WHERE id = $1 FOR UPDATE"
# ON CONFLICT: a registration of the same id racing this one made it first (then
# LOCK_DEVICE tells whose it is).
INSERT_DEVICE = """
INSERT INTO devices (id, tags, auth, primary_thumbprint, ca_name, enrollment_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
RESET_TAGS = "UPDATE devices SET tags = $2, updated_at = now() WHERE id = $1"
DESIRED_OF = "SELECT desired FROM twin_desired WHERE device_id = $1 AND module_id = ''"
# Without a broker link: the patch is stored; the next desired patch publishes it.
STORE_DESIRED = """
INSERT INTO twin_desired (device_id, module_id, desired, version, updated_at)
VALUES ($1, '', jsonb_strip_nulls($2::jsonb), 1, now())
ON CONFLICT (device_id, module_id) DO UPDATE
SET desired = jsonb_strip_nulls(twin_desired.desired || $2::jsonb),
    version = twin_desired.version + 1, updated_at = now()
"""
RECORD = """
INSERT INTO registrations AS r (enrollment_id, registration_id, device_id, operation_id,
                                status, error)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (enrollment_id, registration_id) DO UPDATE
SET device_id = coalesce(EXCLUDED.device_id, r.device_id), operation_id = EXCLUDED.operation_id,
    status = EXCLUDED.status, error = EXCLUDED.error, attempts = r.attempts + 1,
    updated_at = now()
"""
ANSWER = """
SELECT r.operation_id, r.status, r.error, r.device_id, d.auth, d.key_version
FROM registrations r LEFT JOIN devices d ON d.id = r.device_id
WHERE r.enrollment_id = $1 AND r.registration_id = $2
"""

# --- enrollments ----------------------------------------------------------------------
_COLUMNS = """
id, kind, attestation, ca_name, encode(thumbprint, 'hex') AS thumbprint,
registration_pattern, initial_tags, initial_desired, reprovision, enabled, key_version,
created_at, updated_at,
(SELECT count(*) FROM registrations r WHERE r.enrollment_id = e.id
   AND r.status = 'assigned') AS registrations
"""
INSERT_ENROLLMENT = f"""
INSERT INTO enrollments AS e (id, kind, attestation, key_version, ca_name, thumbprint,
                              registration_pattern, initial_tags, initial_desired,
                              reprovision, enabled)
VALUES ($1, $2, $3,
        CASE WHEN $3 = 'symmetric_key' THEN nextval('device_key_version_seq') ELSE 0 END,
        $4, $5, $6, $7, $8, $9, $10)
RETURNING {_COLUMNS}
"""
LIST_ENROLLMENTS = f"SELECT {_COLUMNS} FROM enrollments e ORDER BY id"
GET_ENROLLMENT = f"SELECT {_COLUMNS} FROM enrollments e WHERE id = $1"
UPDATE_ENROLLMENT = f"""
UPDATE enrollments e SET
    registration_pattern = coalesce($2, registration_pattern),
    initial_tags = coalesce($3, initial_tags),
    initial_desired = coalesce($4, initial_desired),
    reprovision = coalesce($5, reprovision),
    enabled = coalesce($6, enabled),
    updated_at = now()
WHERE id = $1
RETURNING {_COLUMNS}
"""
NEW_ENROLLMENT_KEY = f"""
UPDATE enrollments e SET key_version = nextval('device_key_version_seq'), updated_at = now()
WHERE id = $1 AND attestation = 'symmetric_key'
RETURNING {_COLUMNS}
"""
DELETE_ENROLLMENT = "DELETE FROM enrollments WHERE id = $1"
LIST_REGISTRATIONS = """
SELECT registration_id, device_id, status, error, attempts, operation_id, created_at,
       updated_at
FROM registrations
WHERE enrollment_id = $1 AND ($2::text IS NULL OR registration_id > $2)
ORDER BY registration_id LIMIT $3
"""
CA_VERIFIED = "SELECT EXISTS (SELECT 1 FROM x509_cas WHERE name = $1 AND verified_at IS NOT NULL)"
