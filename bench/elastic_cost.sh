#!/usr/bin/env bash
# What fault tolerance costs a failure-free run of the main job: throughput
# (samples/s after an epoch's first 20 steps) of Fashion-MNIST under
# `weft run -n W`, side by side in one run, alternating, R rounds:
#   plain          no commit, no checkpoint
#   commit-1       weft run --elastic W:W, an in-memory commit every step
#   commit-10      the same, every 10 steps
#   ckpt-100       an asynchronous disk checkpoint every 100 steps
# Prints the median of each and its ratio to plain (BENCHMARKS.md, "Fault
# tolerance").
#
#   bench/elastic_cost.sh [--workers 4] [--rounds 3] [--train-samples 48000]
set -euo pipefail
cd "$(dirname "$0")/.."
workers=4 rounds=3 samples=48000
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --train-samples) samples=$2; shift 2 ;;
    *) echo "elastic_cost.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
build=${BUILD:-build}
cmake --build "$build" --target weft_cli fashion_mnist >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--json --epochs 1 --train-samples "$samples" --test-samples 1000 --balance none)
run() {  # run NAME LAUNCHER-ARGS... -- JOB-ARGS...
  local name=$1; shift
  local largs=() jargs=()
  while [ "$1" != "--" ]; do largs+=("$1"); shift; done
  shift
  jargs=("$@")
  "$build/bin/weft" run -n "$workers" --oversubscribe "${largs[@]}" -- \
    "$build/bin/fashion_mnist" "${common[@]}" "${jargs[@]}" 2>/dev/null |
    sed -n 's/^\[0\] //p' | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        j = json.loads(line)
    except ValueError:
        continue
    if "epoch" in j:
        print(j["samples_per_s"])' >> "$tmp/$name"
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs; $workers workers, $rounds rounds"
for r in $(seq 1 "$rounds"); do
  run plain --
  run commit-1 --elastic "$workers:$workers" -- --commit-every 1
  run commit-10 --elastic "$workers:$workers" -- --commit-every 10
  rm -rf "$tmp/ck"
  run ckpt-100 -- --checkpoint-dir "$tmp/ck" --checkpoint-every 100
  echo "round $r done" >&2
done
python3 - "$tmp" <<'EOF'
import statistics, sys, os
d = sys.argv[1]
med = {}
for n in ["plain", "commit-1", "commit-10", "ckpt-100"]:
    p = os.path.join(d, n)
    v = [float(x) for x in open(p).read().split()] if os.path.exists(p) else []
    med[n] = statistics.median(v) if v else float("nan")
    print(f"{n:10s} median {med[n]:8.1f} samples/s  ({len(v)} runs: {', '.join(f'{x:.0f}' for x in v)})")
for n in ["commit-1", "commit-10", "ckpt-100"]:
    print(f"{n:10s} / plain = {med[n] / med['plain']:.3f}")
EOF
