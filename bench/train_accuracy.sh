#!/usr/bin/env bash
# Accuracy of BSP against local SGD on Fashion-MNIST (../shared/guide/MEASURING.md:
# test accuracy on the full 10k test set after the final epoch, median of 3
# seeds). The two settings alternate (BSP seed 0, local SGD seed 0, BSP seed 1, ...).
#
#   bench/train_accuracy.sh [--workers N] [--epochs E] [--seeds "0 1 2"] [--local-steps H]
#                           [--build DIR] [-- EXTRA JOB ARGS]
# Defaults: 4 workers, 5 epochs, seeds 0 1 2, H = 8, the job's default
# hyper-parameters (batch 64 per worker, SGD lr 0.1 momentum 0.9, cosine
# schedule with half an epoch of warm-up).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
workers=4
epochs=5
seeds="0 1 2"
local_steps=8
build="$root/build"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --local-steps) local_steps=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "train_accuracy.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for seed in $seeds; do
  for sync in bsp local-sgd; do
    f="$out/$sync-$seed.txt"
    echo "== $sync seed $seed" >&2
    "$build/bin/weft" run -n "$workers" "$build/bin/fashion_mnist" --json --epochs "$epochs" \
      --seed "$seed" --sync "$sync" --local-steps "$local_steps" "${extra[@]}" >"$f" 2>&1 ||
      { cat "$f" >&2; exit 1; }
    grep '{' "$f" | sed 's/^\[0\] //' >&2
  done
done
python3 - "$out" "$epochs" "$workers" "$local_steps" <<'EOF'
import glob, json, os, statistics, sys
out, epochs, workers, h = sys.argv[1:]
acc = {}
for path in sorted(glob.glob(os.path.join(out, "*.txt"))):
    sync, seed = os.path.basename(path)[:-4].rsplit("-", 1)
    rows = [json.loads(l[l.index("{"):]) for l in open(path) if "{" in l and "test_accuracy" in l]
    acc.setdefault(sync, {})[int(seed)] = [r["test_accuracy"] for r in rows]
print(f"test accuracy (10k test set) per epoch, {workers} workers x batch 64, {epochs} epochs")
print()
print("| setting | seed | " + " | ".join(f"epoch {e + 1}" for e in range(int(epochs))) + " |")
print("| --- | ---: |" + " ---: |" * int(epochs))
for sync in ["bsp", "local-sgd"]:
    for seed, a in sorted(acc.get(sync, {}).items()):
        name = "BSP" if sync == "bsp" else f"local SGD, H={h}"
        print(f"| {name} | {seed} | " + " | ".join(f"{x:.4f}" for x in a) + " |")
med = {s: statistics.median(a[-1] for a in acc[s].values()) for s in acc}
print()
for s in med:
    print(f"median final accuracy, {s}: {med[s]:.4f}")
if len(med) == 2:
    print(f"local SGD - BSP: {100 * (med['local-sgd'] - med['bsp']):+.2f} percentage points")
EOF
