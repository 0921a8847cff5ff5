#!/usr/bin/env bash
# Weft over shared memory against Open MPI's shared-memory BTL (vader), float32
# allreduce on one host, measured alike (../shared/guide/MEASURING.md): the
# two sides run alternately (weft, vader, weft, vader, ...) ROUNDS times per
# world size; the table has the median over rounds of each side's figure
# (itself a median over iterations) and their ratio.
#
# Alike means: both reduce in place (weft-bench --in-place, as
# ../shared/anchors/mpi_allreduce.c does), and both are bound to cores the
# way mpirun binds them by default: one core per rank when the ranks fit on
# the cores (np <= cores: "bind to core"), unbound when they do not.
#
#   bench/shm_vs_vader.sh [-b BUILD_DIR] [-r ROUNDS] [-e K=V]... [N...]    (default: build, 3, 2 4)
#
# -e passes an environment variable to the Weft workers (e.g. -e WEFT_SPIN_US=50).
# Needs libopenmpi-dev openmpi-bin (scripts/deps.sh bench) and ../shared/anchors.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$here/../build
rounds=3
envs=()
while getopts "b:r:e:" opt; do
  case $opt in
    b) build=$(cd "$OPTARG" && pwd) ;;
    r) rounds=$OPTARG ;;
    e) envs+=(--env "$OPTARG") ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
ns=${*:-2 4}
anchors=$(cd "$here/../../shared/anchors" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mpicc -O2 "$anchors/mpi_allreduce.c" -o "$out/mpi_allreduce"
printf '#!/bin/sh\nexec taskset -c "$WEFT_LOCAL_RANK" "$@"\n' >"$out/bind.sh"
chmod +x "$out/bind.sh"
echo "# $(date -u +%FT%TZ), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for n in $ns; do
  for r in $(seq "$rounds"); do
    bind=()
    if [ "$n" -le "$(nproc)" ]; then bind=("$out/bind.sh"); fi
    "$build/bin/weft" run -n "$n" "${envs[@]}" "${bind[@]}" \
      "$build/bin/weft-bench" allreduce --in-place --json | sed -n 's/^\[0\] //p' >"$out/weft.$n.$r"
    timeout 600 mpirun --allow-run-as-root --oversubscribe -np "$n" --mca btl vader,self \
      --mca pml ob1 "$out/mpi_allreduce" 2>&1 | grep -v '^\[' >"$out/vader.$n.$r"
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$out" "$rounds" $ns <<'EOF'
import json, statistics, sys
out, rounds, ns = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
def load(n):
    w, v = {}, {}
    for r in range(1, rounds + 1):
        for line in open(f"{out}/weft.{n}.{r}"):
            j = json.loads(line)
            w.setdefault(j["bytes"], []).append((j["time_us"], j["busbw_gbps"], j["cpu_us_per_iter"], j["transport"], j["algo"]))
        for line in open(f"{out}/vader.{n}.{r}"):
            f = line.split()
            if len(f) == 5:
                v.setdefault(int(f[0]), []).append((float(f[1]), float(f[3]), float(f[4])))
    return w, v
med = statistics.median
for n in ns:
    w, v = load(n)
    t = w[min(w)][0][3]
    print(f"\nn={n}, weft transport {t}, {rounds} rounds each")
    print("| bytes | weft algo | weft time us | vader time us | weft busbw GB/s | vader busbw GB/s | weft/vader busbw | weft cpu us/iter | vader cpu us/iter |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in sorted(w):
        if b not in v:
            continue
        wt, wb, wc = (med(x[i] for x in w[b]) for i in range(3))
        vt, vb, vc = (med(x[i] for x in v[b]) for i in range(3))
        print(f"| {b} | {w[b][0][4]} | {wt:.1f} | {vt:.1f} | {wb:.3f} | {vb:.3f} | {wb / vb:.2f} | {wc:.0f} | {vc:.0f} |")
EOF
