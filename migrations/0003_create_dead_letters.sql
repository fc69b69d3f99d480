-- Messages ingest could not use, kept with their raw bytes and the reason.
--
-- A message is dead-lettered in the same transaction as the valid readings of its
-- batch and acknowledged after that commits; a redelivery after a crash before the
-- acknowledgement can therefore store its dead letter twice (readings are exactly once,
-- dead letters at least once).

CREATE TABLE ingest_dead_letter (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    topic        TEXT NOT NULL,
    device_id    TEXT,
    reason       TEXT NOT NULL,
    payload      BYTEA NOT NULL
);
CREATE INDEX ingest_dead_letter_received_at_idx ON ingest_dead_letter (received_at);
CREATE INDEX ingest_dead_letter_device_idx ON ingest_dead_letter (device_id, received_at);

-- Stable SQL surface (PROTOCOL.md).
CREATE VIEW dead_letters AS
SELECT received_at, topic, reason, payload, device_id, id
FROM ingest_dead_letter;
