#!/bin/bash
# Run once by the image's entrypoint (docker-entrypoint.sh), when it has initialized an
# empty data directory, as the superuser over the local socket; a volume that already
# holds a database skips it, so later changes to the passwords are made with ALTER ROLE
# (../../README.md, "Secrets").
#
#   fleetline          the services' login: owns the database fleetline, where
#                      `fleetline migrate` creates everything; CREATEROLE because the
#                      migrations create the role fleetline_reader when it is missing.
#   fleetline_grafana  Grafana's login: reads only what fleetline_reader may read (the
#                      views the migrations grant it), with a statement timeout so a wide
#                      time range cannot load the database ingest writes to.
#   fleetline_broker   the broker plugin's login; its SELECT on the device registry is
#                      granted after the first migration has made the tables (README).
#
# The extension is created here, as the superuser, so that the migrations (run as
# fleetline) find it; TimescaleDB is preloaded by the image's postgresql.conf.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
    -v fleetline_password="$FLEETLINE_DB_PASSWORD" \
    -v grafana_password="$FLEETLINE_GRAFANA_DB_PASSWORD" \
    -v broker_password="$FLEETLINE_BROKER_DB_PASSWORD" <<'SQL'
CREATE ROLE fleetline LOGIN CREATEROLE PASSWORD :'fleetline_password';
CREATE DATABASE fleetline OWNER fleetline;

SELECT 'CREATE ROLE fleetline_reader NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fleetline_reader') \gexec
CREATE ROLE fleetline_grafana LOGIN PASSWORD :'grafana_password';
ALTER ROLE fleetline_grafana SET statement_timeout = '30s';
GRANT fleetline_reader TO fleetline_grafana;

CREATE ROLE fleetline_broker LOGIN PASSWORD :'broker_password';

GRANT CONNECT ON DATABASE fleetline TO fleetline_grafana, fleetline_broker;

\connect fleetline
CREATE EXTENSION IF NOT EXISTS timescaledb;
SQL
