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
# too). Usage:
#   bench/train_vs_ddp.sh [--rounds N] [--epochs E] [--single] [--build DIR] [--anchors DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=3
epochs=1
single=0
build="$root/build"
anchors="$root/../shared/anchors"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --single) single=1; shift ;;
    --build) build=$2; shift 2 ;;
    --anchors) anchors=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
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
print(f"{rows[-1][\"samples_per_s_all\"]:.1f} {rows[-1][\"samples_per_s\"]:.1f}")' "$1"
}

for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds" >&2
  # A: weft, 2 workers.
  "$weft" run -n 2 "$job" "${common[@]}" >"$out/a.txt" 2>&1 || { cat "$out/a.txt" >&2; exit 1; }
  echo "weft2 $r $(weft_rate "$out/a.txt")" | tee -a "$results" >&2
  # B: DDP, 2 workers.
  ANCHOR_PORT=$((29600 + r)) "$anchors/run_anchors.sh" ddp --world 2 --model cnn --epochs "$epochs" \
    --batch 64 --lr 0.05 --threads 1 >"$out/b.txt" 2>&1 || { cat "$out/b.txt" >&2; exit 1; }
  echo "ddp2 $r $(awk '/samples\/s/ { for (i = 1; i < NF; ++i) if ($i == "samples/s") v = $(i + 1) } END { print v }' "$out/b.txt")" |
    tee -a "$results" >&2
  # C: ceiling, two independent single-worker processes at once.
  "$weft" run -n 1 "$job" "${common[@]}" >"$out/c1.txt" 2>&1 &
  p1=$!
  "$weft" run -n 1 "$job" "${common[@]}" --seed 1 >"$out/c2.txt" 2>&1 &
  p2=$!
  wait "$p1" || { cat "$out/c1.txt" >&2; exit 1; }
  wait "$p2" || { cat "$out/c2.txt" >&2; exit 1; }
  read -r c1 c1w <<<"$(weft_rate "$out/c1.txt")"
  read -r c2 c2w <<<"$(weft_rate "$out/c2.txt")"
  echo "ceiling $r $(python3 -c "print(f'{$c1 + $c2:.1f} {$c1w + $c2w:.1f}')")" | tee -a "$results" >&2
  if [ "$single" = 1 ]; then
    "$weft" run -n 1 "$job" "${common[@]}" >"$out/s.txt" 2>&1 || { cat "$out/s.txt" >&2; exit 1; }
    echo "single $r $(weft_rate "$out/s.txt")" | tee -a "$results" >&2
  fi
done

python3 - "$results" "$rounds" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[0], []).append([float(x) for x in f[2:]])
def med(k, i=0):
    return statistics.median(v[i] for v in rows[k]) if k in rows else float("nan")
names = {"weft2": "Weft, 2 workers (BSP)", "ddp2": "PyTorch DDP, 2 workers (gloo)",
         "ceiling": "ceiling: 2 independent weft processes", "single": "1 weft process alone"}
print(f"samples/s, one epoch, batch 64 per worker, 1 thread per worker; median of {sys.argv[2]} rounds (A B C alternating)")
print()
print("| setting | samples/s (median) | runs | after first 20 steps |")
print("| --- | ---: | --- | ---: |")
for k in ["weft2", "ddp2", "ceiling", "single"]:
    if k in rows:
        runs = ", ".join(f"{v[0]:.0f}" for v in rows[k])
        after = f"{med(k, 1):.0f}" if len(rows[k][0]) > 1 else "-"
        print(f"| {names[k]} | {med(k):.0f} | {runs} | {after} |")
print()
print(f"Weft / DDP: {med('weft2') / med('ddp2'):.2f}x   (target >= 1.4x)")
print(f"Weft / ceiling: {100 * med('weft2') / med('ceiling'):.1f}%   (target >= 90%)")
print(f"DDP / ceiling: {100 * med('ddp2') / med('ceiling'):.1f}%")
if "single" in rows:
    print(f"ceiling / single: {med('ceiling') / med('single'):.2f}x; Weft 2 workers / single: {med('weft2') / med('single'):.2f}x; DDP / single: {med('ddp2') / med('single'):.2f}x")
EOF
