-- Rollups recompute only the minutes that received readings (plain PostgreSQL).
--
-- 0005 marked hours, so every roll-up round re-read the whole current hour of each
-- active series: with many series written every second, far more rows than had
-- arrived. Marks are now minutes: a round recomputes the marked minutes from their raw
-- rows, then the hours holding them from their (at most 60) minute rows. Hours are
-- built from minutes, which is exact because minute rollups are kept at least as long
-- as raw readings (the storage settings say so) and ingest refuses readings older than
-- that.

ALTER TABLE rollup_pending RENAME COLUMN hour TO minute;
-- An hour mark from before meant "the whole hour": mark its other 59 minutes too.
INSERT INTO rollup_pending (series_id, minute)
SELECT p.series_id, p.minute + m * INTERVAL '1 minute'
FROM rollup_pending p, generate_series(1, 59) AS m
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION fleetline_mark_rollups() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- DO UPDATE locks an existing mark: a concurrent roll-up skips it (see 0007).
    INSERT INTO rollup_pending AS p (series_id, minute)
    SELECT DISTINCT series_id, date_bin(INTERVAL '1 minute', ts, TIMESTAMPTZ '2000-01-01 00:00+00')
    FROM new_rows
    ORDER BY 1, 2
    ON CONFLICT (series_id, minute) DO UPDATE SET minute = excluded.minute;
    RETURN NULL;
END
$$;

DROP FUNCTION fleetline_roll_up(INTEGER);

-- Recompute up to max_marks marked (series, minute) pairs and their hours; returns how
-- many marks. Replicas may run it at once: each takes marks the others have not locked.
-- A no-op on TimescaleDB.
CREATE FUNCTION fleetline_roll_up(max_marks INTEGER) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    sids     INTEGER[];
    minutes  TIMESTAMPTZ[];
    hsids    INTEGER[];
    hours    TIMESTAMPTZ[];
BEGIN
    IF (SELECT timescale FROM storage_config) THEN
        RETURN 0;
    END IF;
    WITH taken AS (
        DELETE FROM rollup_pending p
        USING (SELECT series_id, minute FROM rollup_pending
               ORDER BY minute LIMIT max_marks FOR UPDATE SKIP LOCKED) t
        WHERE p.series_id = t.series_id AND p.minute = t.minute
        RETURNING p.series_id, p.minute
    )
    SELECT array_agg(series_id), array_agg(minute) INTO sids, minutes FROM taken;
    IF sids IS NULL THEN
        RETURN 0;
    END IF;

    DELETE FROM telemetry_1m r
    USING unnest(sids, minutes) AS t(series_id, minute)
    WHERE r.series_id = t.series_id AND r.bucket = t.minute;
    INSERT INTO telemetry_1m (series_id, bucket, count, value_count, sum, min, max, last)
    SELECT d.series_id, t.minute,
           count(*), count(d.value), sum(d.value), min(d.value), max(d.value),
           (array_agg(d.value ORDER BY d.ts DESC) FILTER (WHERE d.value IS NOT NULL))[1]
    FROM unnest(sids, minutes) AS t(series_id, minute)
    JOIN telemetry d ON d.series_id = t.series_id
                    AND d.ts >= t.minute AND d.ts < t.minute + INTERVAL '1 minute'
    GROUP BY d.series_id, t.minute;

    SELECT array_agg(series_id), array_agg(hour) INTO hsids, hours
    FROM (SELECT DISTINCT series_id,
                 date_bin(INTERVAL '1 hour', minute, TIMESTAMPTZ '2000-01-01 00:00+00') AS hour
          FROM unnest(sids, minutes) AS t(series_id, minute)) h;
    DELETE FROM telemetry_1h r
    USING unnest(hsids, hours) AS t(series_id, hour)
    WHERE r.series_id = t.series_id AND r.bucket = t.hour;
    INSERT INTO telemetry_1h (series_id, bucket, count, value_count, sum, min, max, last)
    SELECT r.series_id, t.hour, sum(r.count), sum(r.value_count), sum(r.sum), min(r.min),
           max(r.max),
           (array_agg(r.last ORDER BY r.bucket DESC) FILTER (WHERE r.last IS NOT NULL))[1]
    FROM unnest(hsids, hours) AS t(series_id, hour)
    JOIN telemetry_1m r ON r.series_id = t.series_id
                       AND r.bucket >= t.hour AND r.bucket < t.hour + INTERVAL '1 hour'
    GROUP BY r.series_id, t.hour;
    RETURN cardinality(sids);
END
$$;
