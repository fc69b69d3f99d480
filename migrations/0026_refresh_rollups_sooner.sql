-- TimescaleDB: the continuous aggregates refreshed sooner.
--
-- Real-time aggregation reads the raw rows newer than what an aggregate has
-- materialized, so readings arriving as they are taken show in readings_1m and
-- readings_1h at once. A reading written later into a minute already materialized (a
-- device flushing its backlog after an outage) shows once the next refresh has run:
-- until now within a minute for the minute rollup and within five minutes for the
-- hourly one, now within 10 seconds and one minute. A refresh with nothing new to
-- materialize or invalidated costs almost nothing. No-op on plain PostgreSQL, whose
-- rollups are exact when their readings commit.
DO $$
DECLARE
    job RECORD;
BEGIN
    IF NOT (SELECT timescale FROM storage_config) THEN
        RETURN;
    END IF;
    FOR job IN
        -- A refresh policy's job names its continuous aggregate as its hypertable.
        SELECT job_id, hypertable_name
        FROM timescaledb_information.jobs
        WHERE proc_name = 'policy_refresh_continuous_aggregate'
          AND hypertable_name IN ('telemetry_1m', 'telemetry_1h')
    LOOP
        PERFORM alter_job(job.job_id, schedule_interval => CASE job.hypertable_name
            WHEN 'telemetry_1m' THEN INTERVAL '10 seconds'
            ELSE INTERVAL '1 minute' END);
    END LOOP;
END
$$;
