#!/usr/bin/env bash
# Training throughput, Weft against PyTorch DDP and against the
# no-communication ceiling, measured side by side in one run
# (../shared/guide/MEASURING.md): the settings alternate A B C A B C ...,
# and the report gives each one's median and the ratios of the medians.
#
#   A  weft, 2 workers:  weft run -n 2 fashion_mnist (BSP, gradient buckets)
#   B  PyTorch DDP, 2 workers (gloo): run_anchors.sh ddp --world 2 --model cnn
#   C  ceiling: two independent single-worker weft processes at the same
#      time (weft run -n 1 fashion_mnist, twice, no communication): the sum
#   S  (with --single) one single-worker weft process alone
#
# Same model (the anchor's CNN), batch 64 per worker, SGD lr 0.05 momentum
# 0.9, one intra-op thread per worker, one epoch of Fashion-MNIST.
# samples/s is over the whole epoch between two barriers, which is how the
# DDP script measures (Weft's "after the first 20 steps" figure is printed
# too).
#
# The machine is shared: before each run the script waits (up to --quiet-wait
# seconds, default 120) until the CPUs are at least 90% idle for a second,
# and it reports for each run the share of the machine's CPU time that other
# processes took while it ran ("foreign"). Medians are given over all runs
# and over the clean ones (foreign < 10%). Usage:
#   bench/train_vs_ddp.sh [--rounds N] [--epochs E] [--single] [--quiet-wait S]
#                         [--build DIR] [--anchors DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=3
epochs=1
single=0
quiet_wait=120
build="$root/build"
anchors="$root/../shared/anchors"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --single) single=1; shift ;;
    --quiet-wait) quiet_wait=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --anchors) anchors=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "train_vs_ddp.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
weft="$build/bin/weft"
job="$build/bin/fashion_mnist"
for f in "$weft" "$job" "$anchors/run_anchors.sh"; do
  [ -e "$f" ] || { echo "train_vs_ddp.sh: $f is missing" >&2; exit 1; }
done
common=(--epochs "$epochs" --batch-size 64 --lr 0.05 --lr-schedule constant --warmup-epochs 0
        --momentum 0.9 --threads 1 --json)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
results="$out/results.txt"  # lines: setting round samples_per_s [after-20-steps figure]

# The last epoch's samples/s (whole epoch and after 20 steps) from --json output.
weft_rate() {
  python3 -c '
import json, sys
rows = [json.loads(l[l.index("{"):]) for l in open(sys.argv[1]) if "{" in l and "samples_per_s" in l]
print("%.1f %.1f" % (rows[-1]["samples_per_s_all"], rows[-1]["samples_per_s"]))' "$1"
}

cores=$(nproc)
. "$(dirname "$0")/quiet.sh"  # busy, wait_quiet, measure_start
# measure_start; run; measure_end RUSAGE_FILES...: sets $foreign, the share
# of the machine's CPU time that other processes took meanwhile.
measure_end() {
  local b1 t1 ours
  b1=$(busy); t1=$(date +%s.%N)
  ours=$(cat "$@" | awk '{ s += $1 + $2 } END { print s }')
  foreign=$(python3 -c "w = $t1 - $t0; f = ($b1 - $b0) / $hz - $ours; print('%.3f' % max(0.0, f / (w * $cores)))")
}
timed() {  # timed RUSAGE_FILE OUTPUT_FILE CMD...
  local ru=$1 log=$2
  shift 2
  /usr/bin/time -f "%U %S" -o "$ru" "$@" >"$log" 2>&1
}

for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds" >&2
  # A: weft, 2 workers.
  wait_quiet; measure_start
  timed "$out/a.ru" "$out/a.txt" "$weft" run -n 2 "$job" "${common[@]}" || { cat "$out/a.txt" >&2; exit 1; }
  measure_end "$out/a.ru"
  echo "weft2 $r $foreign $(weft_rate "$out/a.txt")" | tee -a "$results" >&2
  # B: DDP, 2 workers.
  wait_quiet; measure_start
  ANCHOR_PORT=$((29600 + r)) timed "$out/b.ru" "$out/b.txt" "$anchors/run_anchors.sh" ddp --world 2 \
    --model cnn --epochs "$epochs" --batch 64 --lr 0.05 --threads 1 || { cat "$out/b.txt" >&2; exit 1; }
  measure_end "$out/b.ru"
  rate=$(awk '/samples\/s/ { for (i = 1; i < NF; ++i) if ($i == "samples/s") v = $(i + 1) } END { print v }' "$out/b.txt")
  echo "ddp2 $r $foreign $rate" | tee -a "$results" >&2
  # C: ceiling, two independent single-worker processes at once.
  wait_quiet; measure_start
  timed "$out/c1.ru" "$out/c1.txt" "$weft" run -n 1 "$job" "${common[@]}" &
  p1=$!
  timed "$out/c2.ru" "$out/c2.txt" "$weft" run -n 1 "$job" "${common[@]}" --seed 1 &
  p2=$!
  wait "$p1" || { cat "$out/c1.txt" >&2; exit 1; }
  wait "$p2" || { cat "$out/c2.txt" >&2; exit 1; }
  measure_end "$out/c1.ru" "$out/c2.ru"
  read -r c1 c1w <<<"$(weft_rate "$out/c1.txt")"
  read -r c2 c2w <<<"$(weft_rate "$out/c2.txt")"
  echo "ceiling $r $foreign $(python3 -c "print('%.1f %.1f' % ($c1 + $c2, $c1w + $c2w))")" | tee -a "$results" >&2
  if [ "$single" = 1 ]; then
    wait_quiet; measure_start
    timed "$out/s.ru" "$out/s.txt" "$weft" run -n 1 "$job" "${common[@]}" || { cat "$out/s.txt" >&2; exit 1; }
    measure_end "$out/s.ru"
    echo "single $r $foreign $(weft_rate "$out/s.txt")" | tee -a "$results" >&2
  fi
done

python3 - "$results" "$rounds" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[0], []).append([float(x) for x in f[2:]])  # foreign, rate[, rate after 20 steps]
def med(k, clean=False, i=1):
    v = [r[i] for r in rows.get(k, []) if not clean or r[0] < 0.10]
    return statistics.median(v) if v else float("nan")
names = {"weft2": "Weft, 2 workers (BSP)", "ddp2": "PyTorch DDP, 2 workers (gloo)",
         "ceiling": "ceiling: 2 independent weft processes", "single": "1 weft process alone"}
print(f"samples/s, one epoch, batch 64 per worker, 1 thread per worker; {sys.argv[2]} rounds, settings alternating")
print()
print("| setting | median | median of clean runs | runs (foreign CPU share) | Weft: after first 20 steps |")
print("| --- | ---: | ---: | --- | ---: |")
for k in ["weft2", "ddp2", "ceiling", "single"]:
    if k in rows:
        runs = ", ".join(f"{r[1]:.0f} ({100 * r[0]:.0f}%)" for r in rows[k])
        after = f"{med(k, i=2):.0f}" if len(rows[k][0]) > 2 else "-"
        print(f"| {names[k]} | {med(k):.0f} | {med(k, True):.0f} | {runs} | {after} |")
print()
for clean in (False, True):
    tag = "clean runs" if clean else "all runs"
    w, d, c = med("weft2", clean), med("ddp2", clean), med("ceiling", clean)
    print(f"{tag}: Weft / DDP {w / d:.2f}x (target >= 1.4x); Weft / ceiling {100 * w / c:.1f}% "
          f"(target >= 90%); DDP / ceiling {100 * d / c:.1f}%")
    if "single" in rows:
        s = med("single", clean)
        print(f"{tag}: ceiling / single {c / s:.2f}x; Weft 2 workers / single {w / s:.2f}x; "
              f"DDP / single {d / s:.2f}x")
EOF
