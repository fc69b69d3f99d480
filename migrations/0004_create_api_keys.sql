-- API keys for the REST API, written by the api service and the CLI.
--
-- A key reads "flk_<id>_<secret>". The secret is 32 random bytes shown once; the table
-- keeps its SHA-256 only. A fast hash is enough for a random 256-bit secret (there is
-- no dictionary to try); a slow password hash would only slow every request.

CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY CHECK (id ~ '^[a-z0-9]{12}$'),
    name           TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    secret_sha256  BYTEA NOT NULL CHECK (length(secret_sha256) = 32),
    scopes         TEXT[] NOT NULL CHECK (
                       cardinality(scopes) > 0
                       AND scopes <@ ARRAY['devices:read', 'devices:write', 'telemetry:read',
                                           'commands:write', 'rules:write', 'admin']::text[]),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at   TIMESTAMPTZ,
    revoked_at     TIMESTAMPTZ
);
