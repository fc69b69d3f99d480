-- Rollups kept current as readings are written (plain PostgreSQL).
--
-- Until now a write only marked its (series, minute) in rollup_pending, and ingest
-- recomputed each marked minute from its raw rows once it had settled. Under a live
-- load that recomputation arrives as one lump per minute (8-9 million rows at 150,000
-- readings/s) on the cores that also run the batches: paced, it still held p99
-- publish-to-queryable at about 450 ms. Now the statement that inserts readings adds
-- them to their minute and hour in the same transaction: count, value_count and sum
-- add up, min and max compare, and `last` is the value with the latest timestamp,
-- which the new last_ts column keeps. The work follows what arrives, rows already in
-- the statement's transition table (after ON CONFLICT: duplicates add nothing), and a
-- rollup is exact as soon as its readings commit, late readings included.
--
-- Minute and hour rows are upserted in key order, minutes first, so concurrent writers
-- (two ingest replicas, two writers of one) lock them in one order; a writer into a row
-- another holds waits for its commit, as it waited for the mark before.

DO $$
BEGIN
    -- The functions that wrote and consumed the marks are no longer defined by
    -- migrations/functions/. For one release the previous release's processes keep
    -- working during a rolling upgrade: rollup_pending stays (empty: its API reads no
    -- pending hours) and fleetline_roll_up becomes a no-op (its ingest calls it).
    IF to_regclass('schema_definitions') IS NOT NULL THEN
        DELETE FROM schema_definitions
        WHERE name IN ('fleetline_roll_up', 'fleetline_mark_rollups');
    END IF;
    CREATE OR REPLACE FUNCTION fleetline_roll_up(
        max_marks INTEGER, settle INTERVAL DEFAULT INTERVAL '0 seconds'
    ) RETURNS INTEGER LANGUAGE sql AS $f$ SELECT 0 $f$;
    IF current_setting('fleetline.timescale') = 'on' THEN
        DROP FUNCTION IF EXISTS fleetline_mark_rollups();
        RETURN;
    END IF;

    -- No reading is written while the rollups change hands.
    LOCK TABLE telemetry IN SHARE MODE;

    -- Every marked minute (settled or not) and its hour recomputed from raw rows once more.
    DELETE FROM telemetry_1m r USING rollup_pending p
    WHERE r.series_id = p.series_id AND r.bucket = p.minute;
    INSERT INTO telemetry_1m (series_id, bucket, count, value_count, sum, min, max, last)
    SELECT d.series_id, p.minute,
           count(*), count(d.value), sum(d.value), min(d.value), max(d.value),
           (array_agg(d.value ORDER BY d.ts DESC) FILTER (WHERE d.value IS NOT NULL))[1]
    FROM rollup_pending p
    JOIN telemetry d ON d.series_id = p.series_id
                    AND d.ts >= p.minute AND d.ts < p.minute + INTERVAL '1 minute'
    GROUP BY d.series_id, p.minute;
    CREATE TEMPORARY TABLE pending_hours ON COMMIT DROP AS
    SELECT DISTINCT series_id,
           date_bin(INTERVAL '1 hour', minute, TIMESTAMPTZ '2000-01-01 00:00+00') AS hour
    FROM rollup_pending;
    DELETE FROM telemetry_1h r USING pending_hours h
    WHERE r.series_id = h.series_id AND r.bucket = h.hour;
    INSERT INTO telemetry_1h (series_id, bucket, count, value_count, sum, min, max, last)
    SELECT r.series_id, h.hour, sum(r.count), sum(r.value_count), sum(r.sum), min(r.min),
           max(r.max),
           (array_agg(r.last ORDER BY r.bucket DESC) FILTER (WHERE r.last IS NOT NULL))[1]
    FROM pending_hours h
    JOIN telemetry_1m r ON r.series_id = h.series_id
                       AND r.bucket >= h.hour AND r.bucket < h.hour + INTERVAL '1 hour'
    GROUP BY r.series_id, h.hour;

    -- The time of each bucket's last value, from the raw rows still kept (a bucket whose
    -- raw rows expired keeps NULL: ingest refuses readings that old, so no new reading
    -- competes with its last value).
    -- One pass over the raw rows (all within the raw retention), grouped, not a lookup
    -- per rollup row.
    ALTER TABLE telemetry_1m ADD COLUMN last_ts TIMESTAMPTZ;
    ALTER TABLE telemetry_1h ADD COLUMN last_ts TIMESTAMPTZ;
    UPDATE telemetry_1m r SET last_ts = x.last_ts
    FROM (SELECT series_id,
                 date_bin(INTERVAL '1 minute', ts, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
                 max(ts) AS last_ts
          FROM telemetry WHERE value IS NOT NULL GROUP BY 1, 2) x
    WHERE r.series_id = x.series_id AND r.bucket = x.bucket AND r.last IS NOT NULL;
    UPDATE telemetry_1h r SET last_ts = x.last_ts
    FROM (SELECT series_id,
                 date_bin(INTERVAL '1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
                 max(last_ts) AS last_ts
          FROM telemetry_1m WHERE last_ts IS NOT NULL GROUP BY 1, 2) x
    WHERE r.series_id = x.series_id AND r.bucket = x.bucket AND r.last IS NOT NULL;

    DROP TRIGGER telemetry_rollup_marks ON telemetry;
    DROP FUNCTION fleetline_mark_rollups();
    TRUNCATE rollup_pending;

    CREATE FUNCTION fleetline_add_to_rollups() RETURNS trigger
    LANGUAGE plpgsql AS $f$
    BEGIN
        INSERT INTO telemetry_1m AS r
               (series_id, bucket, count, value_count, sum, min, max, last, last_ts)
        SELECT series_id, date_bin(INTERVAL '1 minute', ts, TIMESTAMPTZ '2000-01-01 00:00+00'),
               count(*), count(value), sum(value), min(value), max(value),
               (array_agg(value ORDER BY ts DESC) FILTER (WHERE value IS NOT NULL))[1],
               max(ts) FILTER (WHERE value IS NOT NULL)
        FROM new_rows
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (series_id, bucket) DO UPDATE SET
            count = r.count + excluded.count,
            value_count = r.value_count + excluded.value_count,
            sum = CASE WHEN r.sum IS NULL THEN excluded.sum
                       WHEN excluded.sum IS NULL THEN r.sum
                       ELSE r.sum + excluded.sum END,
            min = LEAST(r.min, excluded.min),
            max = GREATEST(r.max, excluded.max),
            last = CASE WHEN excluded.last_ts IS NOT NULL
                         AND (r.last_ts IS NULL OR excluded.last_ts >= r.last_ts)
                        THEN excluded.last ELSE r.last END,
            last_ts = GREATEST(r.last_ts, excluded.last_ts);

        INSERT INTO telemetry_1h AS r
               (series_id, bucket, count, value_count, sum, min, max, last, last_ts)
        SELECT series_id, date_bin(INTERVAL '1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00+00'),
               count(*), count(value), sum(value), min(value), max(value),
               (array_agg(value ORDER BY ts DESC) FILTER (WHERE value IS NOT NULL))[1],
               max(ts) FILTER (WHERE value IS NOT NULL)
        FROM new_rows
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (series_id, bucket) DO UPDATE SET
            count = r.count + excluded.count,
            value_count = r.value_count + excluded.value_count,
            sum = CASE WHEN r.sum IS NULL THEN excluded.sum
                       WHEN excluded.sum IS NULL THEN r.sum
                       ELSE r.sum + excluded.sum END,
            min = LEAST(r.min, excluded.min),
            max = GREATEST(r.max, excluded.max),
            last = CASE WHEN excluded.last_ts IS NOT NULL
                         AND (r.last_ts IS NULL OR excluded.last_ts >= r.last_ts)
                        THEN excluded.last ELSE r.last END,
            last_ts = GREATEST(r.last_ts, excluded.last_ts);
        RETURN NULL;
    END
    $f$;

    CREATE TRIGGER telemetry_rollups
    AFTER INSERT ON telemetry
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION fleetline_add_to_rollups();
END
$$;
