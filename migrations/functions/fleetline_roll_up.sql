-- Recomputes up to max_marks marked (series, minute) pairs that ended at least `settle`
-- ago, and their hours; returns how many marks it took. Replicas may run it at once:
-- each takes marks the others have not locked. A no-op on TimescaleDB. (Created by 0005,
-- last changed by 0020.)
-- revision: 1
CREATE OR REPLACE FUNCTION fleetline_roll_up(
    max_marks INTEGER, settle INTERVAL DEFAULT INTERVAL '0 seconds'
) RETURNS INTEGER
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
               WHERE minute + INTERVAL '1 minute' + settle <= now()
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
