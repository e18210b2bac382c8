#!/usr/bin/env bash
# Builds syncluster's C libraries in release mode and the C examples
# against the static one:
#   target/release/libsyncluster.a, target/release/libsyncluster.so
#   target/c/hello        examples/c/hello.c: the hello cluster, blocking workers
#   target/c/uv_worker    examples/c/uv_worker.c: workers inside a libuv loop
#   target/c/readme       examples/c/readme.c: the README's 30-line example
#   target/c/syncluster.pc  pkg-config file pointing at this tree
# Needs a C compiler, pkg-config and libuv's headers
# (Debian: apt-get install -y gcc pkg-config libuv1-dev).
#   scripts/build_c.sh [--debug]   --debug: the debug library, into target/c/debug/
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PROFILE=release
OUT=target/c
if [[ "${1:-}" == "--debug" ]]; then
    PROFILE=debug
    OUT=target/c/debug
fi
missing=()
command -v "${CC:-cc}" >/dev/null || missing+=(gcc)
command -v pkg-config >/dev/null || missing+=(pkg-config)
if command -v pkg-config >/dev/null && ! pkg-config --exists libuv; then missing+=(libuv1-dev); fi
if ((${#missing[@]})); then
    echo "build_c.sh: missing ${missing[*]}: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
if [[ $PROFILE == release ]]; then
    cargo build --release --lib
else
    cargo build --lib
fi
LIB=target/$PROFILE
mkdir -p "$OUT"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
sed -e "s|@PREFIX@|$ROOT|" -e "s|@INCLUDEDIR@|$ROOT/include|" \
    -e "s|@LIBDIR@|$ROOT/$LIB|" -e "s|@VERSION@|$VERSION|" syncluster.pc.in >"$OUT/syncluster.pc"
# Static: the archive, then what Rust's std needs from libc
# (`Libs.private`, as `cargo rustc -- --print native-static-libs` lists it).
PRIVATE=$(PKG_CONFIG_PATH="$OUT" pkg-config --libs-only-l --static syncluster | sed 's/-lsyncluster//')
CFLAGS=(-std=c99 -O2 -g -Wall -Wextra -Werror -Iinclude)
"${CC:-cc}" "${CFLAGS[@]}" -o "$OUT/hello" examples/c/hello.c "$LIB/libsyncluster.a" $PRIVATE
"${CC:-cc}" "${CFLAGS[@]}" -o "$OUT/readme" examples/c/readme.c "$LIB/libsyncluster.a" $PRIVATE
"${CC:-cc}" "${CFLAGS[@]}" $(pkg-config --cflags libuv) -o "$OUT/uv_worker" examples/c/uv_worker.c \
    "$LIB/libsyncluster.a" $(pkg-config --libs libuv) $PRIVATE
echo "built $OUT/hello $OUT/uv_worker $OUT/readme (static) and $OUT/syncluster.pc" >&2
