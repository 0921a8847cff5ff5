#!/usr/bin/env bash
# Hierarchical vs flat ring allreduce on an emulated cluster: 2 hosts x 2
# ranks, links shaped to 1 Gbit/s (scripts/cluster.sh; needs root). Each run
# is one multi-node job (`weft run --nnodes 2` on each host) of weft-bench
# (MEASURING.md: warm-ups, barrier before each timed call, max over ranks,
# median over iterations); the two algorithms run alternately, A B A B ...,
# and the summary gives each one's median busbw over runs and the ratio.
#
#   bench/cluster_allreduce.sh [--build DIR] [--rounds N] [--rate RATE]
#                              [--min-bytes 1M] [--max-bytes 64M]
# Prints every run's table, then a markdown table for BENCHMARKS.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
build=$root/build
rounds=3
rate=1gbit
min=1M
max=64M
while [ $# -gt 0 ]; do
  case "$1" in
  --build) build=$2; shift 2 ;;
  --rounds) rounds=$2; shift 2 ;;
  --rate) rate=$2; shift 2 ;;
  --min-bytes) min=$2; shift 2 ;;
  --max-bytes) max=$2; shift 2 ;;
  --inside) inside=1; shift ;;
  *) echo "usage: $0 [--build DIR] [--rounds N] [--rate RATE] [--min-bytes B] [--max-bytes B]" >&2; exit 2 ;;
  esac
done
bin=$build/bin
for b in weft weft-bench; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing: build first (make build)" >&2; exit 1; }
done

if [ -z "${inside:-}" ]; then
  # Build the cluster, run this script inside it, tear it down whatever happens.
  exec "$root/scripts/cluster.sh" run --rate "$rate" 2 -- "$0" --inside --build "$build" \
    --rounds "$rounds" --rate "$rate" --min-bytes "$min" --max-bytes "$max"
fi

prefix=$WEFT_CLUSTER_PREFIX
WEFT_JOB_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export WEFT_JOB_TOKEN
results=$(mktemp)
trap 'rm -f "$results"' EXIT
port=29500
echo "# weft-bench allreduce float32, 2 hosts x 2 ranks, links $rate, $rounds rounds (A B A B ...)"
echo "# kernel $(uname -r), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
for round in $(seq 1 "$rounds"); do
  for algo in hierarchical ring; do
    port=$((port + 1))
    out=$(mktemp)
    common=(--nnodes 2 --master "10.77.0.1:$port" --nproc-per-node 2 --timeout 120)
    bench=("$bin/weft-bench" allreduce --min-bytes "$min" --max-bytes "$max" --algo "$algo")
    "$root/scripts/cluster.sh" exec "$prefix" 1 "$bin/weft" run --node-rank 0 "${common[@]}" \
      "${bench[@]}" >"$out" 2>&1 &
    node0=$!
    code1=0
    "$root/scripts/cluster.sh" exec "$prefix" 2 "$bin/weft" run --node-rank 1 "${common[@]}" \
      "${bench[@]}" >/dev/null 2>&1 || code1=$?
    code0=0
    wait $node0 || code0=$?
    echo "## round $round, $algo"
    cat "$out"
    if [ $code0 -ne 0 ] || [ $code1 -ne 0 ]; then
      echo "run failed (node 0: $code0, node 1: $code1)" >&2
      exit 1
    fi
    # "[0]  bytes count type op algo time_us algbw busbw cpu errors"
    awk -v a="$algo" '$1 == "[0]" && $2 ~ /^[0-9]+$/ {
      if ($11 != 0) { print "wrong results in " a > "/dev/stderr"; exit 1 }
      print a, $2, $7, $9 }' "$out" >>"$results"
    rm -f "$out"
  done
done

# Medians over runs (time and busbw) per algorithm and size; ratio of busbw.
echo
echo "| bytes | hierarchical busbw GB/s (time) | flat ring busbw GB/s (time) | hierarchical / ring |"
echo "| ---: | ---: | ---: | ---: |"
sort -k2,2n -k1,1 "$results" | awk '
  function median(list,   n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  function human(b) { return b >= 1048576 ? b / 1048576 " MiB" : b / 1024 " KiB" }
  { bw[$1, $2] = bw[$1, $2] " " $4; tm[$1, $2] = tm[$1, $2] " " $3; sizes[$2] = 1 }
  END {
    n = 0; for (s in sizes) order[++n] = s + 0
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (order[j] < order[i]) { t = order[i]; order[i] = order[j]; order[j] = t }
    for (i = 1; i <= n; i++) {
      s = order[i]
      h = median(bw["hierarchical", s]); r = median(bw["ring", s])
      printf "| %s | %.3f (%.1f ms) | %.3f (%.1f ms) | %.2fx |\n", human(s), h,
             median(tm["hierarchical", s]) / 1000, r, median(tm["ring", s]) / 1000, h / r
    }
  }'
