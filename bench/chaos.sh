#!/usr/bin/env bash
# Seeded chaos runs of elastic training: SIGKILL of a random worker at a
# random step, two at once, a failure during recovery, SIGSTOP, and with no
# fault (false detections) a worker at 10% of a CPU; with --hosts, over
# emulated hosts: a host killed, a host's link down for 3 s, the host that
# serves the store killed (etcd), and with no fault the links (100 Mbit/s)
# full. Every run's seed is printed, so a failing run can be repeated alone
# (--runs 1 --seed S).
#
#   bench/chaos.sh [--runs 20] [--seed 1] [--workers 4] [--faults kill,stop]
#                  [--epochs 3] [--busy-ms 0]   (CPU time each worker spins per step)
#                  [--hosts 2] [--link-mbit 100] [--link-ballast 262144]
#                  (each job over emulated hosts; faults also host, linkdown, quiet)
#                  [--etcd]   (--hosts 3+: the store is etcd on hosts 1-3; fault storehost)
#
# Needs root for the 10% CPU cgroup (the "slow" fault) and network
# namespaces (--hosts); builds what it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
cmake --build "$build" --target weft_cli elastic_worker >/dev/null
exec /usr/bin/python3 bench/chaos.py --bin "$build/bin" "$@"
