-- Roll-ups leave the minutes still being written alone (plain PostgreSQL).
--
-- A roll-up takes the marks it recomputes and holds them until it commits; a batch that
-- writes into a marked minute waits for it (it marks the minute anew: 0007). Under a
-- live load every series' current minute is marked at every round, so each round
-- recomputed every current minute from its raw rows and stalled ingest's next commit
-- for as long (measured: p99 publish-to-queryable 1.8 s at 100k readings/s, in stalls
-- every 5 s, the rollup interval). With `settle`, a roll-up takes only the minutes that
-- ended at least that long ago: each minute is recomputed once, after it closed (and
-- again only when a late reading marks it), and the minutes being written are never
-- locked. The API reads pending minutes from raw rows, so answers stay exact. Even with
-- the default (0), a minute is taken only once it has ended.

DROP FUNCTION fleetline_roll_up(INTEGER);

CREATE FUNCTION fleetline_roll_up(
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
