-- The last reading of every series, for "latest" queries across a fleet without
-- probing every partition or chunk. Written by ingest in the transaction of each batch
-- (only the newest reading of each series in the batch, and only when newer than what
-- is stored), the same way on TimescaleDB and plain PostgreSQL.

CREATE TABLE series_latest (
    series_id   INTEGER PRIMARY KEY,
    ts          TIMESTAMPTZ NOT NULL,
    value       DOUBLE PRECISION,
    value_text  TEXT
);

INSERT INTO series_latest (series_id, ts, value, value_text)
SELECT DISTINCT ON (series_id) series_id, ts, value, value_text
FROM telemetry
ORDER BY series_id, ts DESC;
