-- Telemetry storage: narrow rows keyed by (series, time).
--
-- A series is one (device, metric) pair with a small integer id, so a stored value is
-- 4 + 8 + 8 bytes plus an optional text, and the primary key is (series_id, ts):
-- compact to write, and exactly the order range queries read. A re-sent reading has
-- the same (device, metric, ts) and so the same key: it is stored once.
--
-- With TimescaleDB (fleetline.timescale = 'on', decided by the migration runner from
-- FLEETLINE_STORAGE_TIMESCALE and the server's extensions) `telemetry` is a hypertable
-- with compression and a retention policy. Otherwise it is a table partitioned by range
-- on ts; partitions are created ahead by fleetline_maintain() and on demand by ingest
-- through fleetline_ensure_partition(), and expired ones are dropped by
-- fleetline_maintain(). Reads and writes use the same SQL on both.

CREATE TABLE series (
    id          INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   TEXT NOT NULL,
    metric      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (device_id, metric)
);

-- The storage choices made when the schema was created, read by the functions below.
CREATE TABLE storage_config (
    singleton           BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    timescale           BOOLEAN NOT NULL,
    partition_interval  INTERVAL NOT NULL CHECK (partition_interval > INTERVAL '0'
                                                 AND date_part('month', partition_interval) = 0
                                                 AND date_part('year', partition_interval) = 0)
);
INSERT INTO storage_config (timescale, partition_interval)
VALUES (current_setting('fleetline.timescale') = 'on',
        current_setting('fleetline.partition_interval')::interval);

DO $$
BEGIN
    IF current_setting('fleetline.timescale') = 'on' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        CREATE TABLE telemetry (
            series_id   INTEGER NOT NULL,
            ts          TIMESTAMPTZ NOT NULL,
            value       DOUBLE PRECISION,
            value_text  TEXT,
            PRIMARY KEY (series_id, ts)
        );
        -- The primary key serves every query by series; a second index on ts alone
        -- would only slow writes.
        PERFORM create_hypertable('telemetry',
                                  by_range('ts', current_setting('fleetline.partition_interval')::interval),
                                  create_default_indexes => false);
        ALTER TABLE telemetry SET (timescaledb.compress,
                                   timescaledb.compress_segmentby = 'series_id',
                                   timescaledb.compress_orderby = 'ts DESC');
        PERFORM add_compression_policy('telemetry',
                                       current_setting('fleetline.compress_after')::interval);
        PERFORM add_retention_policy('telemetry',
                                     current_setting('fleetline.raw_retention')::interval);
    ELSE
        CREATE TABLE telemetry (
            series_id   INTEGER NOT NULL,
            ts          TIMESTAMPTZ NOT NULL,
            value       DOUBLE PRECISION,
            value_text  TEXT,
            PRIMARY KEY (series_id, ts)
        ) PARTITION BY RANGE (ts);
    END IF;
END
$$;

-- Name of the partition holding t (plain PostgreSQL), e.g. telemetry_p20261125t0000.
CREATE FUNCTION fleetline_partition_start(t TIMESTAMPTZ, width INTERVAL) RETURNS TIMESTAMPTZ
LANGUAGE sql IMMUTABLE AS $$
    SELECT date_bin(width, t, TIMESTAMPTZ '2000-01-01 00:00:00+00')
$$;

-- Make sure the partition for t exists. A no-op on TimescaleDB, which makes chunks itself.
CREATE FUNCTION fleetline_ensure_partition(t TIMESTAMPTZ) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    width  INTERVAL;
    lo     TIMESTAMPTZ;
    name   TEXT;
BEGIN
    SELECT partition_interval INTO width FROM storage_config WHERE NOT timescale;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    lo := fleetline_partition_start(t, width);
    name := 'telemetry_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MI');
    IF to_regclass(name) IS NOT NULL THEN
        RETURN;
    END IF;
    -- Replicas may race to create the same partition; the lock makes it one at a time.
    PERFORM pg_advisory_xact_lock(hashtext('fleetline.telemetry_partitions'));
    IF to_regclass(name) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)',
                       name, lo, lo + width);
    END IF;
END
$$;

-- Periodic upkeep (plain PostgreSQL): partitions for the next `ahead` intervals, and
-- partitions entirely older than `keep` dropped. Returns how many were dropped.
-- On TimescaleDB the retention and compression policies do this work.
CREATE FUNCTION fleetline_maintain(keep INTERVAL, ahead INTEGER) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    width    INTERVAL;
    part     RECORD;
    dropped  INTEGER := 0;
BEGIN
    SELECT partition_interval INTO width FROM storage_config WHERE NOT timescale;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    FOR i IN 0..ahead LOOP
        PERFORM fleetline_ensure_partition(now() + width * i);
    END LOOP;
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'telemetry'::regclass
          AND c.relname ~ '^telemetry_p[0-9]{8}t[0-9]{4}$'
          AND to_timestamp(substr(c.relname, 12), 'YYYYMMDD"t"HH24MI')::timestamp
              AT TIME ZONE 'UTC' + width <= now() - keep
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

SELECT fleetline_maintain(current_setting('fleetline.raw_retention')::interval,
                          current_setting('fleetline.partitions_ahead')::integer);

-- Stable SQL surface (PROTOCOL.md): booleans are stored as 0/1 in value, strings in
-- value_text.
CREATE VIEW readings AS
SELECT t.ts          AS time,
       s.device_id   AS device_id,
       s.metric      AS metric,
       t.value       AS value,
       t.value_text  AS value_text
FROM telemetry t
JOIN series s ON s.id = t.series_id;
