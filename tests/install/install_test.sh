#!/usr/bin/env bash
# install_test.sh BUILD_DIR OUTSIDE_SOURCE_DIR
set -euo pipefail
build=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
test -x "$tmp/prefix/bin/weft"
test -f "$tmp/prefix/include/weft/weft.h"
"$tmp/prefix/bin/weft" --version
cmake -S "$src" -B "$tmp/build" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/build" >/dev/null
out=$("$tmp/build/outside")
echo "$out"
[ "$out" = "outside: allreduce of 3 ranks = 6, weft $("$tmp/prefix/bin/weft" --version | awk '{print $NF}')" ]
