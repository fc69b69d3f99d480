-- Marks the (series, minute) pairs a statement wrote into telemetry, for the roll-ups
-- (trigger on telemetry, plain PostgreSQL; created by 0005, last changed by 0008).
-- revision: 1
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
