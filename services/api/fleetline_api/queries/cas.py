"""X.509 CA certificates (routes/cas.py)."""

_COLUMNS = """
name, subject, encode(thumbprint, 'hex') AS thumbprint, not_after,
verified_at IS NOT NULL AS verified,
CASE WHEN verified_at IS NULL THEN verification_code END AS verification_code,
verified_at, created_at
"""
INSERT_CA = f"""
INSERT INTO x509_cas (name, certificate, thumbprint, subject, not_after, verification_code)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING {_COLUMNS}
"""
LIST_CAS = f"SELECT {_COLUMNS} FROM x509_cas ORDER BY name"
GET_CA = f"SELECT {_COLUMNS} FROM x509_cas WHERE name = $1"
CA_FOR_PROOF = "SELECT certificate, verification_code FROM x509_cas WHERE name = $1 FOR UPDATE"
VERIFY_CA = f"""
UPDATE x509_cas SET verified_at = coalesce(verified_at, now()) WHERE name = $1
RETURNING {_COLUMNS}
"""
DELETE_CA = "DELETE FROM x509_cas WHERE name = $1"
