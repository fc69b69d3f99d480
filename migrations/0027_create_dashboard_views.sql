-- What dashboards read, and a role that may read only that (docs/grafana.md).
--
-- readings_1m and readings_1h gain their sums and numeric counts, so a wider bucket
-- made of several rollup rows averages exactly (sum of sums over sum of counts, not an
-- average of averages), and their series id. device_metrics lists each device's series
-- (with its id) and its latest value (series and series_latest: one row per series,
-- never a scan of the readings), for dashboard variables and latest-value tables.
-- A query for one device's rollups finds its series ids there first and filters the
-- rollup by them: on TimescaleDB a rollup is a continuous aggregate, into which a join
-- on device_id does not push the series (a Grafana graph of one device of 1,000 over
-- 30 days: 46.5 ms joined, 1.9 ms filtered; bench/storage.py). limit_refusals shows what the
-- broker refused to devices over their limits.
--
-- fleetline_reader (NOLOGIN) may SELECT the stable views and nothing else; a
-- dashboard's login role is granted it (GRANT fleetline_reader TO fleetline_grafana).
-- Roles belong to the whole server: when the migrating role may not create roles the
-- grant is left to an administrator, with a notice.

CREATE OR REPLACE VIEW readings_1m AS
SELECT r.bucket, s.device_id, s.metric,
       r.sum / nullif(r.value_count, 0) AS avg, r.min, r.max, r.count, r.last,
       r.sum, r.value_count, r.series_id
FROM telemetry_1m r JOIN series s ON s.id = r.series_id;

CREATE OR REPLACE VIEW readings_1h AS
SELECT r.bucket, s.device_id, s.metric,
       r.sum / nullif(r.value_count, 0) AS avg, r.min, r.max, r.count, r.last,
       r.sum, r.value_count, r.series_id
FROM telemetry_1h r JOIN series s ON s.id = r.series_id;

CREATE VIEW device_metrics AS
SELECT s.device_id, s.metric, l.ts AS last_time, l.value AS last_value,
       l.value_text AS last_text, s.id AS series_id
FROM series s LEFT JOIN series_latest l ON l.series_id = s.id;

CREATE VIEW limit_refusals AS
SELECT device_id, messages, bytes, first_refused_at, last_refused_at
FROM device_limit_refusals;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fleetline_reader') THEN
        BEGIN
            CREATE ROLE fleetline_reader NOLOGIN;
        EXCEPTION
            -- Another database's migration created it meanwhile.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role fleetline_reader not created (the migrating role may not '
                             'create roles): create it and run the GRANT of migration 0027';
        END;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'fleetline_reader') THEN
        GRANT SELECT ON readings, readings_1m, readings_1h, device_status, device_metrics,
                        dead_letters, alarms, limit_refusals
        TO fleetline_reader;
    END IF;
END
$$;
