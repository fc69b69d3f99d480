-- Firmware releases and the blobs that hold their images (docs/ota.md).
--
-- Making a release is its own scope, firmware:write: the API signs what is uploaded with
-- the release key, and every board of the target accepts it.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_check CHECK (
    cardinality(scopes) > 0
    AND scopes <@ ARRAY['devices:read', 'devices:write', 'telemetry:read', 'commands:write',
                        'rules:write', 'firmware:write', 'admin']::text[]);

--
-- A blob is uploaded in parts, each a request of its own (PUT with Content-Range), in
-- order, so an upload of any size fits the API's body limit and an interrupted one
-- resumes at `received`. It says up front how large it is and what its SHA-256 must be;
-- the last part completes it only when the bytes hash to that, otherwise its parts are
-- dropped and it starts over. Parts live in PostgreSQL, so every API replica serves
-- every blob; a download reads the parts its Range covers.
CREATE TABLE blobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    size        BIGINT NOT NULL CHECK (size > 0),
    sha256      TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    received    BIGINT NOT NULL DEFAULT 0 CHECK (received >= 0 AND received <= size),
    complete    BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (NOT complete OR received = size)
);

CREATE TABLE blob_parts (
    blob_id  BIGINT NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    start    BIGINT NOT NULL CHECK (start >= 0),
    data     BYTEA NOT NULL CHECK (length(data) > 0),
    PRIMARY KEY (blob_id, start)
);

-- A release: its image (a blob) and, once the image is complete, its manifest (canonical
-- JSON: fleetline/releases.py) and the release key's signature of it, which devices
-- check before they apply anything.
CREATE TABLE firmware (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version     TEXT NOT NULL,
    target      TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('bundle', 'image')),
    notes       TEXT NOT NULL DEFAULT '',
    blob_id     BIGINT NOT NULL UNIQUE REFERENCES blobs (id),
    manifest    TEXT,
    signature   TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    released_at TIMESTAMPTZ,
    UNIQUE (target, version),
    CHECK ((manifest IS NULL) = (signature IS NULL) AND (manifest IS NULL) = (released_at IS NULL))
);
