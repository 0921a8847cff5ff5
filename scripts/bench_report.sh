#!/usr/bin/env bash
# `make bench`: measures Weft's float32 allreduce side by side with the peers
# of ../shared/anchors (Open MPI tcp and shared memory, Gloo ring), in one run,
# and writes the tables into BENCHMARKS.md.
#
#   scripts/bench_report.sh [--reps N] [--max-bytes SIZE] [--worlds "2 4"]
#                           [--build DIR] [--output FILE] [--stdout]
#
# Two comparisons, each by bench/compare_collectives.py (which compiles the
# peers' programs as ../shared/anchors/run_anchors.sh does and alternates
# weft, ompi-tcp, ompi-shm, gloo, ... --reps times; medians of the runs):
#   tcp  Weft over loopback TCP only (WEFT_SHM=0) against Open MPI tcp and Gloo
#   shm  Weft as it runs by default (shared memory between the ranks of a
#        host) against Open MPI tcp and Open MPI shared memory (vader)
# The generated part of FILE (default BENCHMARKS.md) lies between the lines
# "<!-- bench_report: begin -->" and "<!-- bench_report: end -->" (appended
# when they are missing); everything else in FILE is kept. --stdout prints
# the generated part instead.
#
# The machine is shared: run it when nothing else runs (see uptime), and
# read the ratios, not the absolute figures (../shared/guide/MEASURING.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reps=3
max_bytes=16M
worlds="2 4"
build="$root/build"
output="$root/BENCHMARKS.md"
to_stdout=0
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --max-bytes) max_bytes=$2; shift 2 ;;
    --worlds) worlds=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --stdout) to_stdout=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bench_report.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$build" in /*) ;; *) build="$PWD/$build" ;; esac
for f in "$build/bin/weft" "$build/bin/weft-bench"; do
  [ -x "$f" ] || { echo "bench_report.sh: $f is missing: build first (make build)" >&2; exit 1; }
done
for tool in mpicc mpirun g++ python3; do
  command -v "$tool" >/dev/null ||
    { echo "bench_report.sh: $tool is missing (scripts/deps.sh bench installs it)" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | head -1)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
compare=("$root/bench/compare_collectives.py" --worlds $worlds --reps "$reps" --max-bytes "$max_bytes"
         --build "$build")
echo "bench_report: loopback TCP (WEFT_SHM=0) against Open MPI tcp and Gloo" >&2
python3 "${compare[@]}" --weft-env WEFT_SHM=0 >"$tmp/tcp.md"
echo "bench_report: default transports (shared memory) against Open MPI vader" >&2
python3 "${compare[@]}" --shm --no-gloo >"$tmp/shm.md"

{
  echo "<!-- bench_report: begin -->"
  echo "## Collectives: float32 allreduce against Open MPI and Gloo (generated)"
  echo
  echo "Written by \`scripts/bench_report.sh --reps $reps --max-bytes $max_bytes --worlds \"$worlds\"\`"
  echo "(\`make bench\`), $started, commit $commit${dirty:+ plus uncommitted changes}; load average"
  echo "before: $load_before. Sum, in place (as the peers' programs), 4 KiB up to"
  echo "$max_bytes; every run verifies its result. busbw in decimal GB/s (nccl-tests:"
  echo "algbw x 2(n-1)/n); CPU us = CPU time per iteration summed over ranks. Ranks"
  echo "are placed as \`weft run\` and \`mpirun\` place them: one per core at n=2, unbound"
  echo "at n=4 (4 processes on 2 cores)."
  echo
  echo "### Over loopback TCP (Weft with WEFT_SHM=0)"
  echo
  sed 's/^### /#### /' "$tmp/tcp.md"
  echo
  echo "### Weft's default transports (shared memory within a host)"
  echo
  sed 's/^### /#### /' "$tmp/shm.md"
  echo "<!-- bench_report: end -->"
} >"$tmp/section.md"

if [ "$to_stdout" = 1 ]; then
  cat "$tmp/section.md"
  exit 0
fi
touch "$output"
python3 - "$output" "$tmp/section.md" <<'EOF'
import sys
path, section = sys.argv[1], open(sys.argv[2]).read()
text = open(path).read()
begin, end = "<!-- bench_report: begin -->", "<!-- bench_report: end -->"
if begin in text and end in text and text.index(begin) < text.index(end):
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = head + section.rstrip("\n") + tail
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
EOF
echo "bench_report: wrote $output" >&2
