#!/usr/bin/env bash
# Build real MicroPython for the firmware tests (tests/firmware): the unix port of
# MicroPython 1.28.0 (sockets, TLS through mbedtls, hashlib; `-X heapsize=110K` gives it an
# ESP32 app's heap) and mpy-cross, from the same source tree.
#
#   scripts/build-micropython.sh    prints two lines:
#     1. the folder holding `micropython` and `mpy-cross`
#     2. the folder to put on MICROPYPATH for micropython-lib's umqtt.simple
#        (it holds umqtt/simple.py)
#
# Built once into ${FLEETLINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetline}/
# micropython-1.28.0; a marker file makes every later run instant. The source is the
# bundle ../shared/vendor/micropython-1.28.0-bundle.tar.gz beside the repository when it
# exists (MicroPython v1.28.0 with micropython-lib in lib/micropython-lib and mbedtls in
# lib/mbedtls); otherwise the upstream release tarball, which carries the submodules
# (mbedtls, micropython-lib). Nothing is copied into the repository.
# Needs gcc, make, pkg-config and python3 (scripts/ensure-services.sh test installs them);
# curl and xz only when it downloads. Build output goes to logs beside the cache; a
# failure prints their tail.
set -euo pipefail

VERSION=1.28.0
# Bump when the build changes (flags, layout): a cache built otherwise is rebuilt.
BUILD_ID="$VERSION-unix-standard-nobtree-noffi-1"
RELEASE_URL="https://github.com/micropython/micropython/releases/download/v$VERSION/micropython-$VERSION.tar.xz"
# Only when a release tarball lacks micropython-lib (release tarballs carry it).
MICROPYTHON_LIB_URL="https://github.com/micropython/micropython-lib/archive/refs/heads/master.tar.gz"

me=$(basename "$0")
die() { echo "$me: $*" >&2; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE="$ROOT/../shared/vendor/micropython-$VERSION-bundle.tar.gz"
CACHE_ROOT=${FLEETLINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetline}
DEST="$CACHE_ROOT/micropython-$VERSION"
UMQTT="$DEST/micropython-lib/micropython/umqtt.simple"

report() { echo "$DEST/bin"; echo "$UMQTT"; }
built() {
  [ -f "$DEST/.built" ] && [ "$(cat "$DEST/.built")" = "$BUILD_ID" ] \
    && [ -x "$DEST/bin/micropython" ] && [ -x "$DEST/bin/mpy-cross" ] \
    && [ -f "$UMQTT/umqtt/simple.py" ]
}

if built; then report; exit 0; fi

for tool in gcc make pkg-config python3; do
  command -v "$tool" >/dev/null \
    || die "needs $tool to build MicroPython (Debian: scripts/ensure-services.sh test, or apt-get install $tool)"
done

mkdir -p "$CACHE_ROOT"
# One build at a time (parallel test runs): the others wait, then find it built.
if command -v flock >/dev/null; then
  exec 9>"$CACHE_ROOT/micropython-$VERSION.lock"
  flock 9
  if built; then report; exit 0; fi
fi

WORK="$CACHE_ROOT/micropython-$VERSION.work"
LOGS="$CACHE_ROOT/micropython-$VERSION.logs"
rm -rf "$WORK" "$LOGS"
mkdir -p "$WORK/src" "$LOGS"

if [ -f "$BUNDLE" ]; then
  echo "$me: building MicroPython $VERSION from $BUNDLE (about a minute)" >&2
  tar xzf "$BUNDLE" -C "$WORK/src" --strip-components=1
else
  # A user's machine: the upstream release (the same tag, with its submodules).
  command -v curl >/dev/null || die "needs curl to download MicroPython $VERSION (or the bundle at $BUNDLE)"
  command -v xz >/dev/null || die "needs xz to unpack MicroPython $VERSION (Debian: apt-get install xz-utils)"
  echo "$me: downloading MicroPython $VERSION from $RELEASE_URL" >&2
  curl -fsSL --retry 3 -o "$WORK/micropython.tar.xz" "$RELEASE_URL" \
    || die "cannot download $RELEASE_URL"
  tar xJf "$WORK/micropython.tar.xz" -C "$WORK/src" --strip-components=1
  rm -f "$WORK/micropython.tar.xz"
  if [ ! -f "$WORK/src/lib/micropython-lib/micropython/umqtt.simple/umqtt/simple.py" ]; then
    echo "$me: downloading micropython-lib from $MICROPYTHON_LIB_URL" >&2
    curl -fsSL --retry 3 -o "$WORK/micropython-lib.tar.gz" "$MICROPYTHON_LIB_URL" \
      || die "cannot download $MICROPYTHON_LIB_URL"
    rm -rf "$WORK/src/lib/micropython-lib"
    mkdir -p "$WORK/src/lib/micropython-lib"
    tar xzf "$WORK/micropython-lib.tar.gz" -C "$WORK/src/lib/micropython-lib" --strip-components=1
    rm -f "$WORK/micropython-lib.tar.gz"
  fi
fi

SRC="$WORK/src"
[ "$(sed -n 's/^#define MICROPY_VERSION_\(MAJOR\|MINOR\|MICRO\) \([0-9]*\)$/\2/p' \
      "$SRC/py/mpconfig.h" | paste -sd.)" = "$VERSION" ] \
  || die "the source in $SRC is not MicroPython $VERSION"
[ -f "$SRC/lib/mbedtls/include/mbedtls/ssl.h" ] || die "the source lacks lib/mbedtls (TLS)"
[ -f "$SRC/lib/micropython-lib/micropython/umqtt.simple/umqtt/simple.py" ] \
  || die "the source lacks micropython-lib's umqtt.simple"

jobs=$(nproc 2>/dev/null || echo 2)
step() {  # step NAME make-arguments...: run make, its output in $LOGS/NAME.log
  local name=$1; shift
  if ! make -j"$jobs" "$@" >"$LOGS/$name.log" 2>&1; then
    tail -25 "$LOGS/$name.log" >&2
    die "the $name build failed (log: $LOGS/$name.log; tree: $WORK)"
  fi
}
step mpy-cross -C "$SRC/mpy-cross"
# The standard variant: sockets, tls (mbedtls), hashlib, asyncio, with micropython-lib's
# mip and ssl frozen in. btree and ffi are left out (a submodule and libffi that the
# firmware does not use).
step unix -C "$SRC/ports/unix" MICROPY_PY_BTREE=0 MICROPY_PY_FFI=0

MP="$SRC/ports/unix/build-standard/micropython"
"$MP" -c "import tls, socket, hashlib, binascii, json, select" >"$LOGS/check.log" 2>&1 \
  || { cat "$LOGS/check.log" >&2; die "the built micropython lacks a module the tests need"; }

# Keep what the tests use (the binaries, micropython-lib) and drop the build tree.
rm -rf "$DEST"
mkdir -p "$DEST/bin"
cp "$MP" "$DEST/bin/micropython"
cp "$SRC/mpy-cross/build/mpy-cross" "$DEST/bin/mpy-cross"
cp -R "$SRC/lib/micropython-lib" "$DEST/micropython-lib"
mv "$LOGS" "$DEST/logs"
rm -rf "$WORK"
echo "$BUILD_ID" >"$DEST/.built"
report
