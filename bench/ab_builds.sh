#!/usr/bin/env bash
# A/B: two builds of Weft measured side by side in one run, alternating
# A B A B ... (../shared/guide/MEASURING.md), so that a refactoring can show
# it kept the speed. Reports each setting's median per build and the ratio of
# the medians (B / A; above 1 means B is faster).
#
#   allreduce  weft run -n 2 weft-bench allreduce, 4 KiB / 1 MiB / 16 MiB,
#              over shared memory (default) and over TCP (WEFT_SHM=0):
#              time per call, us
#   train      weft run -n 2 fashion_mnist, --max-steps 300 of one epoch:
#              samples/s after the first 20 steps (needs fashion_mnist in
#              both builds; skipped with --no-train)
#
# Usage: bench/ab_builds.sh [--rounds N] [--no-train] BUILD_A BUILD_B
set -euo pipefail
rounds=5
train=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --no-train) train=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "ab_builds.sh: unknown option $1" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ ${#args[@]} -eq 2 ] || { echo "ab_builds.sh: need two build directories (see --help)" >&2; exit 2; }
case "$rounds" in '' | *[!0-9]* | 0) echo "ab_builds.sh: --rounds must be a positive integer" >&2; exit 2 ;; esac
for b in "${args[@]}"; do
  [ -x "$b/bin/weft" ] && [ -x "$b/bin/weft-bench" ] || { echo "ab_builds.sh: $b has no bin/weft and bin/weft-bench" >&2; exit 1; }
  if [ "$train" = 1 ] && [ ! -x "$b/bin/fashion_mnist" ]; then
    echo "ab_builds.sh: $b has no bin/fashion_mnist (build with libtorch, or pass --no-train)" >&2; exit 1
  fi
done
out=$(mktemp)
raw=$(mktemp)
trap 'rm -f "$out" "$raw"' EXIT
export WEFT_ALLOW_UNAUTHENTICATED=1

bench_once() {  # build label shm
  local b=$1 label=$2 shm=$3
  # The run's output goes to a file and is parsed after the run: a parser
  # starting beside it (python3 takes tens of ms of CPU to start) competed
  # with the two ranks on a 2-core machine and inflated the first size.
  WEFT_SHM=$shm "$b/bin/weft" run -n 2 -- "$b/bin/weft-bench" allreduce --min-bytes 4K \
    --max-bytes 16M --json >"$raw" 2>/dev/null
  python3 -c '
import json, sys
label, shm = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    line = line.split("] ", 1)[-1]
    if not line.startswith("{"): continue
    r = json.loads(line)
    if r["bytes"] in (4096, 1 << 20, 16 << 20):
        t = "shm" if shm == "1" else "tcp"
        print("allreduce-%s-%d %s %s" % (t, r["bytes"], label, r["time_us"]))
' "$label" "$shm" <"$raw" >>"$out"
}

train_once() {  # build label
  local b=$1 label=$2
  "$b/bin/weft" run -n 2 -- "$b/bin/fashion_mnist" --epochs 1 --max-steps 300 --test-samples 1000 \
    --threads 1 --json >"$raw" 2>/dev/null
  python3 -c '
import json, sys
rate = None
for line in sys.stdin:
    line = line.split("] ", 1)[-1]
    if not line.startswith("{"): continue
    r = json.loads(line)
    rate = r.get("samples_per_s", rate)  # after the first 20 steps
if rate is not None: print(f"train-2w {sys.argv[1]} {rate}")
' "$label" <"$raw" >>"$out"
}

for ((i = 1; i <= rounds; i++)); do
  for pair in "A ${args[0]}" "B ${args[1]}"; do
    set -- $pair
    bench_once "$2" "$1" 1
    bench_once "$2" "$1" 0
    [ "$train" = 1 ] && train_once "$2" "$1"
  done
  echo "round $i/$rounds done" >&2
done

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "A = ${args[0]}, B = ${args[1]}, $rounds alternating rounds"
python3 - "$out" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    k, label, v = line.split()
    rows.setdefault(k, {}).setdefault(label, []).append(float(v))
print(f"{'metric':<26}{'median A':>12}{'median B':>12}{'B vs A':>10}")
for k in sorted(rows):
    a, b = rows[k].get("A", []), rows[k].get("B", [])
    if not a or not b: continue
    ma, mb = statistics.median(a), statistics.median(b)
    # time: lower is better, so the speed ratio is A/B; rate: B/A.
    ratio = ma / mb if k.startswith("allreduce") else mb / ma
    unit = "us" if k.startswith("allreduce") else "samples/s"
    print(f"{k:<26}{ma:>12.1f}{mb:>12.1f}{ratio:>9.2f}x  ({unit})")
EOF
