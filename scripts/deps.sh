#!/usr/bin/env bash
# Installs the Debian packages Weft needs that are missing (as root, with
# apt-get). `deps.sh` installs what building, testing (clang and clang-format
# for the checks of `make test`; the launchers the tests use: mpirun,
# torchrun) and the demo need;
# `deps.sh bench` adds the peers the benchmarks compare against.
set -euo pipefail
packages=(
  cmake ninja-build g++ make pkg-config
  libssl-dev libspdlog-dev libfmt-dev libcli11-dev nlohmann-json3-dev zlib1g-dev libxxhash-dev
  libcurl4-openssl-dev
  libgtest-dev libgmock-dev
  clang clang-format
  libtorch-dev dataset-fashion-mnist
  iproute2 procps
  openmpi-bin python3-torch
  etcd-server etcd-client
)
# openmpi-bin (mpirun) and python3-torch (torchrun) are the launchers the
# tests start Weft under (tests/launch/launchers_test.cc). etcd-server (and
# etcdctl, in etcd-client) run the 3-member clusters of tests/store
# (EtcdStore, the etcd:// rendezvous backend, which libcurl4-openssl-dev serves).
if [ "${1:-}" = bench ]; then
  packages+=(libgloo-dev libopenmpi-dev libbenchmark-dev python3-matplotlib)
fi
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps.sh: installing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "deps.sh: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
