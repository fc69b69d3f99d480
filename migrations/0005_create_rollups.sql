-- Rollups of telemetry per series, per minute and per hour, behind the views
-- readings_1m and readings_1h (PROTOCOL.md). Each bucket holds: count (every reading,
-- text ones too), value_count (numeric readings), sum, min, max and last (the last
-- numeric value). Buckets are aligned to 2000-01-01 00:00 UTC, like the API's.
--
-- TimescaleDB: continuous aggregates (the hourly one built on the minute one), with
-- real-time aggregation, refresh policies and retention from the settings.
--
-- Plain PostgreSQL: tables kept current incrementally. A statement trigger on
-- telemetry marks each (series, hour) that received rows in rollup_pending (from the
-- transition table: rows actually inserted, after ON CONFLICT), and
-- fleetline_roll_up() recomputes the marked hours from the raw rows, so a rollup always
-- equals the aggregate of its raw rows once its hour has been rolled up, late readings
-- included. Ingest calls it every few seconds.

-- The (series, hour) pairs whose rollups are behind their raw rows: written by the
-- trigger below, emptied by fleetline_roll_up(). Always empty on TimescaleDB; it exists
-- there too so that queries combining rollups and raw rows read the same on both.
CREATE TABLE rollup_pending (
    series_id  INTEGER NOT NULL,
    hour       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (series_id, hour)
);

DO $$
BEGIN
    IF current_setting('fleetline.timescale') = 'on' THEN
        CREATE MATERIALIZED VIEW telemetry_1m
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT series_id,
               time_bucket(INTERVAL '1 minute', ts) AS bucket,
               count(*) AS count,
               count(value) AS value_count,
               sum(value) AS sum,
               min(value) AS min,
               max(value) AS max,
               last(value, ts) FILTER (WHERE value IS NOT NULL) AS last
        FROM telemetry
        GROUP BY series_id, time_bucket(INTERVAL '1 minute', ts)
        WITH NO DATA;

        CREATE MATERIALIZED VIEW telemetry_1h
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT series_id,
               time_bucket(INTERVAL '1 hour', bucket) AS bucket,
               sum(count)::bigint AS count,
               sum(value_count)::bigint AS value_count,
               sum(sum) AS sum,
               min(min) AS min,
               max(max) AS max,
               last(last, bucket) FILTER (WHERE last IS NOT NULL) AS last
        FROM telemetry_1m
        GROUP BY series_id, time_bucket(INTERVAL '1 hour', bucket)
        WITH NO DATA;

        -- start_offset NULL: late readings, however old, are refreshed too.
        PERFORM add_continuous_aggregate_policy('telemetry_1m', start_offset => NULL,
            end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '1 minute');
        PERFORM add_continuous_aggregate_policy('telemetry_1h', start_offset => NULL,
            end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '5 minutes');
        PERFORM add_retention_policy('telemetry_1m',
                                     current_setting('fleetline.rollup_1m_retention')::interval);
        PERFORM add_retention_policy('telemetry_1h',
                                     current_setting('fleetline.rollup_1h_retention')::interval);
    ELSE
        CREATE TABLE telemetry_1m (
            series_id    INTEGER NOT NULL,
            bucket       TIMESTAMPTZ NOT NULL,
            count        BIGINT NOT NULL,
            value_count  BIGINT NOT NULL,
            sum          DOUBLE PRECISION,
            min          DOUBLE PRECISION,
            max          DOUBLE PRECISION,
            last         DOUBLE PRECISION,
            PRIMARY KEY (series_id, bucket)
        );
        CREATE TABLE telemetry_1h (LIKE telemetry_1m INCLUDING ALL);

        CREATE FUNCTION fleetline_mark_rollups() RETURNS trigger
        LANGUAGE plpgsql AS $f$
        BEGIN
            INSERT INTO rollup_pending (series_id, hour)
            SELECT DISTINCT series_id, date_bin(INTERVAL '1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00+00')
            FROM new_rows
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END
        $f$;

        CREATE TRIGGER telemetry_rollup_marks
        AFTER INSERT ON telemetry
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION fleetline_mark_rollups();
    END IF;
END
$$;

-- Recompute up to max_hours marked (series, hour) pairs from raw rows; returns how
-- many. Replicas may run it at once: each takes marks the others have not locked.
-- A no-op on TimescaleDB.
CREATE FUNCTION fleetline_roll_up(max_hours INTEGER) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    sids   INTEGER[];
    hours  TIMESTAMPTZ[];
BEGIN
    IF (SELECT timescale FROM storage_config) THEN
        RETURN 0;
    END IF;
    WITH taken AS (
        DELETE FROM rollup_pending p
        USING (SELECT series_id, hour FROM rollup_pending
               ORDER BY hour LIMIT max_hours FOR UPDATE SKIP LOCKED) t
        WHERE p.series_id = t.series_id AND p.hour = t.hour
        RETURNING p.series_id, p.hour
    )
    SELECT array_agg(series_id), array_agg(hour) INTO sids, hours FROM taken;
    IF sids IS NULL THEN
        RETURN 0;
    END IF;

    DELETE FROM telemetry_1m r
    USING unnest(sids, hours) AS t(series_id, hour)
    WHERE r.series_id = t.series_id AND r.bucket >= t.hour AND r.bucket < t.hour + INTERVAL '1 hour';
    INSERT INTO telemetry_1m (series_id, bucket, count, value_count, sum, min, max, last)
    SELECT d.series_id,
           date_bin(INTERVAL '1 minute', d.ts, TIMESTAMPTZ '2000-01-01 00:00+00'),
           count(*), count(d.value), sum(d.value), min(d.value), max(d.value),
           (array_agg(d.value ORDER BY d.ts DESC) FILTER (WHERE d.value IS NOT NULL))[1]
    FROM unnest(sids, hours) AS t(series_id, hour)
    JOIN telemetry d ON d.series_id = t.series_id
                    AND d.ts >= t.hour AND d.ts < t.hour + INTERVAL '1 hour'
    GROUP BY 1, 2;

    DELETE FROM telemetry_1h r
    USING unnest(sids, hours) AS t(series_id, hour)
    WHERE r.series_id = t.series_id AND r.bucket = t.hour;
    INSERT INTO telemetry_1h (series_id, bucket, count, value_count, sum, min, max, last)
    SELECT r.series_id, t.hour, sum(r.count), sum(r.value_count), sum(r.sum), min(r.min),
           max(r.max),
           (array_agg(r.last ORDER BY r.bucket DESC) FILTER (WHERE r.last IS NOT NULL))[1]
    FROM unnest(sids, hours) AS t(series_id, hour)
    JOIN telemetry_1m r ON r.series_id = t.series_id
                       AND r.bucket >= t.hour AND r.bucket < t.hour + INTERVAL '1 hour'
    GROUP BY r.series_id, t.hour;
    RETURN cardinality(sids);
END
$$;

-- Drop rollups older than their retention (plain PostgreSQL); returns rows removed.
CREATE FUNCTION fleetline_expire_rollups(keep_1m INTERVAL, keep_1h INTERVAL) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    a BIGINT;
    b BIGINT;
BEGIN
    IF (SELECT timescale FROM storage_config) THEN
        RETURN 0;
    END IF;
    DELETE FROM telemetry_1m WHERE bucket < now() - keep_1m;
    GET DIAGNOSTICS a = ROW_COUNT;
    DELETE FROM telemetry_1h WHERE bucket < now() - keep_1h;
    GET DIAGNOSTICS b = ROW_COUNT;
    RETURN a + b;
END
$$;

-- Stable SQL surface (PROTOCOL.md).
CREATE VIEW readings_1m AS
SELECT r.bucket, s.device_id, s.metric,
       r.sum / nullif(r.value_count, 0) AS avg, r.min, r.max, r.count, r.last
FROM telemetry_1m r JOIN series s ON s.id = r.series_id;

CREATE VIEW readings_1h AS
SELECT r.bucket, s.device_id, s.metric,
       r.sum / nullif(r.value_count, 0) AS avg, r.min, r.max, r.count, r.last
FROM telemetry_1h r JOIN series s ON s.id = r.series_id;
