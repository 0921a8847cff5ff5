#!/usr/bin/env bash
# Time lost per failure: Weft's elastic recovery against torchrun
# --max_restarts with a checkpoint each epoch (issue 11). Builds what it
# runs; needs Python's torch (Debian python3-torch) and the Fashion-MNIST
# dataset; prints a Markdown report (bench/restart_compare.py says what
# it measures).
#
#   bench/restart_compare.sh [--rounds 3] [--workers 4] [--epochs 3]
#                            [--train-samples 12000] [--keep FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
anchors=${ANCHORS:-../shared/anchors}
[ -f "$anchors/torch_ddp_fmnist.py" ] || {
  echo "restart_compare.sh: $anchors/torch_ddp_fmnist.py is missing (set ANCHORS=DIR)" >&2
  exit 1
}
cmake --build "$build" --target weft_cli fashion_mnist >/dev/null
exec /usr/bin/python3 bench/restart_compare.py --bin "$build/bin" --anchors "$anchors" "$@"
