-- Rollup marks, made safe under concurrency, and backfilled (plain PostgreSQL).
--
-- 0005 marked an hour with ON CONFLICT DO NOTHING, which takes no lock on a mark that
-- exists: a roll-up could then take that mark (SKIP LOCKED) and recompute the hour
-- before the batch that marked it had committed, and the batch's rows were never rolled
-- up. A mark is now written with ON CONFLICT DO UPDATE, which locks it: a concurrent
-- roll-up skips it, or the writer waits for the roll-up and marks the hour anew. Marks
-- are written in (series, hour) order, so replicas lock them in one order.

CREATE OR REPLACE FUNCTION fleetline_mark_rollups() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rollup_pending AS p (series_id, hour)
    SELECT DISTINCT series_id, date_bin(INTERVAL '1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00+00')
    FROM new_rows
    ORDER BY 1, 2
    ON CONFLICT (series_id, hour) DO UPDATE SET hour = excluded.hour;
    RETURN NULL;
END
$$;

-- Readings stored before the rollups existed are rolled up once too.
INSERT INTO rollup_pending (series_id, hour)
SELECT DISTINCT series_id, date_bin(INTERVAL '1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00+00')
FROM telemetry
WHERE NOT (SELECT timescale FROM storage_config)
ON CONFLICT DO NOTHING;
