-- Files uploaded by devices (docs/uploads.md): a device asks over MQTT for an upload
-- (devices/{id}/transfers/req), declaring the file's name, size, SHA-256 and content
-- type; it gets a short-lived URL signed for it and that file, and PUTs the bytes in
-- parts (Content-Range), resuming where the upload stands. The bytes are a blob
-- (migration 0028): complete only once they hash as declared.
--
-- One writer, the api service. A file is `uploading` until its last part, then
-- `complete`; an upload not finished by `expires_at` is deleted with its blob by the
-- API's sweep. A name is a device's own: one file per (device, name).
CREATE TABLE device_files (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    name          TEXT NOT NULL CHECK (name ~ '^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$'),
    content_type  TEXT NOT NULL CHECK (length(content_type) BETWEEN 1 AND 128),
    blob_id       BIGINT NOT NULL UNIQUE REFERENCES blobs (id),
    state         TEXT NOT NULL DEFAULT 'uploading' CHECK (state IN ('uploading', 'complete')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at  TIMESTAMPTZ,
    -- An upload not complete by then is deleted (NULL once complete).
    expires_at    TIMESTAMPTZ,
    UNIQUE (device_id, name),
    CHECK ((state = 'complete') = (completed_at IS NOT NULL)),
    CHECK ((state = 'complete') = (expires_at IS NULL))
);

CREATE INDEX device_files_expiring ON device_files (expires_at) WHERE state = 'uploading';

-- A device's blobs go with it: the files' rows cascade, their blobs are deleted here.
CREATE FUNCTION fleetline_drop_file_blob() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM blobs WHERE id = OLD.blob_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER device_files_blob AFTER DELETE ON device_files
FOR EACH ROW EXECUTE FUNCTION fleetline_drop_file_blob();

-- Message routes of files: a route whose source is 'files' forwards each file that
-- lands of the devices its query selects (its metadata, not its bytes). The rules
-- service reads the files completed after its mark, in (completed_at, id) order and a
-- few seconds after they completed (the transaction completing one is then committed),
-- and enqueues their deliveries in the transaction that moves the mark: no file is
-- skipped or routed twice.
ALTER TABLE message_routes
    ADD COLUMN source TEXT NOT NULL DEFAULT 'readings' CHECK (source IN ('readings', 'files')),
    ADD CONSTRAINT message_routes_files_forward_whole CHECK (source = 'readings' OR metric IS NULL);

-- One row, the rules service's (its one writer).
CREATE TABLE route_file_marks (
    one           BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    completed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    file_id       BIGINT NOT NULL DEFAULT 0
);
INSERT INTO route_file_marks DEFAULT VALUES;

CREATE INDEX device_files_completed ON device_files (completed_at, id) WHERE state = 'complete';
