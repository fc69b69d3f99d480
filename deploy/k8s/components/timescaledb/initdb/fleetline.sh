#!/bin/bash
# Run once by the image's entrypoint (docker-entrypoint.sh), when it has initialized an
# empty data directory, as the superuser over the local socket; a volume that already
# holds a database skips it, so later changes to the passwords are made with ALTER ROLE
# (../../README.md, "Secrets").
#
#   fleetline          the services' login: owns the database fleetline, where
#                      `fleetline migrate` creates everything. No CREATEROLE: the role
#                      the migrations grant the dashboards' views, fleetline_reader, is
#                      made here.
#   fleetline_grafana  Grafana's login: reads only what fleetline_reader may read (the
#                      views the migrations grant it), with a statement timeout so a wide
#                      time range cannot load the database ingest writes to.
#   fleetline_broker   the broker plugin's login; its SELECT on the device registry is
#                      granted after the first migration has made the tables (README).
#
# The extension is created here, as the superuser, so that the migrations (run as
# fleetline) find it; TimescaleDB is preloaded by the image's postgresql.conf.
set -euo pipefail

# The passwords are read from the environment by psql itself (\getenv), never put on a
# command line, where any process in the pod could read them.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv fleetline_password FLEETLINE_DB_PASSWORD
\getenv grafana_password FLEETLINE_GRAFANA_DB_PASSWORD
\getenv broker_password FLEETLINE_BROKER_DB_PASSWORD
CREATE ROLE fleetline LOGIN PASSWORD :'fleetline_password';
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
