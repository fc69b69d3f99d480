-- Self-provisioning (docs/provisioning.md): enrollments say who may register itself,
-- registrations record who did.
--
-- An enrollment is a group (any registration id its pattern allows) or individual (one
-- device, whose registration id is the enrollment's id). Its attestation is
--   symmetric_key  the enrollment key is derived from the deployment's device-key secret
--                  and key_version, never stored: HMAC-SHA256(secret,
--                  "enrollment\n{id}\n{key_version}"). A group's device proves
--                  HMAC-SHA256(enrollment key, registration id); an individual one the
--                  enrollment key itself;
--   x509           a group's device presents a certificate signed by the verified CA
--                  ca_name with its registration id as common name; an individual one
--                  the certificate whose thumbprint is registered.
-- registration_pattern is a PostgreSQL regular expression the whole registration id
-- must match (the broker's plugin and the API both ask PostgreSQL).
CREATE TABLE enrollments (
    id                   TEXT PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    kind                 TEXT NOT NULL CHECK (kind IN ('group', 'individual')),
    attestation          TEXT NOT NULL CHECK (attestation IN ('symmetric_key', 'x509')),
    key_version          INTEGER NOT NULL DEFAULT 0 CHECK (key_version >= 0),
    ca_name              TEXT REFERENCES x509_cas (name) ON DELETE RESTRICT,
    thumbprint           BYTEA CHECK (length(thumbprint) = 32),
    registration_pattern TEXT NOT NULL DEFAULT '.*',
    initial_tags         JSONB NOT NULL DEFAULT '{}'::jsonb,
    initial_desired      JSONB NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(initial_desired) = 'object'),
    -- A device that provisions again: keep its tags and twin, or reset them to these.
    reprovision          TEXT NOT NULL DEFAULT 'keep' CHECK (reprovision IN ('keep', 'reset')),
    enabled              BOOLEAN NOT NULL DEFAULT true,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (attestation <> 'x509' OR kind <> 'group' OR ca_name IS NOT NULL),
    CHECK (attestation <> 'x509' OR kind <> 'individual' OR thumbprint IS NOT NULL),
    CHECK (attestation <> 'symmetric_key' OR (ca_name IS NULL AND thumbprint IS NULL))
);

-- Which enrollment provisioned a device (NULL: registered by hand). Provisioning never
-- takes over a device registered by hand or through another enrollment.
ALTER TABLE devices ADD COLUMN enrollment_id TEXT REFERENCES enrollments (id) ON DELETE SET NULL;

CREATE TABLE registrations (
    enrollment_id   TEXT NOT NULL REFERENCES enrollments (id) ON DELETE CASCADE,
    registration_id TEXT NOT NULL,
    device_id       TEXT,
    operation_id    UUID NOT NULL UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('assigned', 'failed')),
    error           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 1,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (enrollment_id, registration_id)
);
