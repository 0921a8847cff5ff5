#!/usr/bin/env bash
# `make demo`: the main job. Trains the Fashion-MNIST CNN data-parallel on 4
# local workers (weft run -n 4) for 5 epochs with BSP, which reaches about
# 91% test accuracy. Extra arguments go to the job and override the
# defaults, e.g.
#   make demo DEMO_ARGS="--epochs 2"
#   make demo DEMO_ARGS="--sync local-sgd --local-steps 8"
#   scripts/demo.sh -n 2 --epochs 1            # -n N first: number of workers
# Environment: BUILD (default build), WEFT_DEMO_WORKERS (default 4).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-build}
case "$build" in /*) ;; *) build="$root/$build" ;; esac
workers=${WEFT_DEMO_WORKERS:-4}
if [ "${1:-}" = "-n" ] && [ $# -ge 2 ]; then
  workers=$2
  shift 2
fi

weft="$build/bin/weft"
job="$build/bin/fashion_mnist"
for f in "$weft" "$job"; do
  if [ ! -x "$f" ]; then
    echo "demo: $f is missing: build first (make build; the job needs libtorch-dev)" >&2
    exit 1
  fi
done
data=/usr/share/datasets/fashion-mnist
if [ ! -e "$data/train-images-idx3-ubyte.gz" ] && [ ! -e "$data/train-images-idx3-ubyte" ]; then
  echo "demo: Fashion-MNIST is not in $data (Debian package dataset-fashion-mnist; make deps installs it)" >&2
  exit 1
fi

defaults=(--epochs 5 --batch-size 64 --lr 0.1 --lr-schedule cosine --warmup-epochs 0.5
          --sync bsp --threads 1 --seed 0)
echo "demo: Fashion-MNIST CNN, data-parallel over $workers local worker processes"
echo "demo: $weft run -n $workers --no-prefix $job ${defaults[*]} $*"
echo "demo: each worker uses 1 intra-op thread; on 2 cores expect a few minutes for 5 epochs"
echo
# Later options win (CLI11 keeps the last value), so "$@" overrides the defaults.
exec "$weft" run -n "$workers" --no-prefix "$job" "${defaults[@]}" "$@"
