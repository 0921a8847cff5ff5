#!/usr/bin/env bash
# An emulated cluster on one machine, for tests and benchmarks: K network
# namespaces ("hosts") PREFIX-h1..PREFIX-hK with addresses 10.77.0.1..K on a
# bridge of their own, which lives in one more namespace (PREFIX-sw). Every
# host's link is shaped to RATE by tbf in both directions (the host's eth0
# egress, and the switch port's egress towards it). Nothing is created in the
# root namespace, so clusters of different prefixes (parallel test runs) and
# ../shared/anchors/netlab.sh (wh*, wlbr0, 10.88.0.0/24) never clash. Needs
# root and iproute2 (scripts/deps.sh installs it).
#
#   cluster.sh check                      exit 0 if clusters can be built here, else say why
#   cluster.sh up PREFIX K [RATE]         build (replacing a cluster of that prefix)
#   cluster.sh down PREFIX                kill what runs in its hosts, remove it
#   cluster.sh exec PREFIX I CMD [ARG...] run CMD on host I
#   cluster.sh kill PREFIX I              SIGKILL everything on host I (the host dies)
#   cluster.sh link PREFIX I down|up      take host I's link down (both ends) or up
#   cluster.sh addr I                     address of host I (10.77.0.I)
#   cluster.sh gc                         remove clusters whose creator process is gone
#   cluster.sh run [--prefix P] [--rate RATE] K -- CMD [ARG...]
#       build a cluster, run CMD (in the root namespace) with WEFT_CLUSTER_PREFIX,
#       WEFT_CLUSTER_HOSTS and WEFT_CLUSTER_SCRIPT set, and remove the cluster when
#       CMD ends, fails or is interrupted; exits with CMD's code.
#
# RATE is a tc rate ("1gbit", "100mbit"); none or "0" leaves links unshaped.
set -eEuo pipefail

SELF=$(readlink -f "$0")
STATE=/run/weft-cluster  # PREFIX.owner: pid of the process that owns the cluster

die() { echo "cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -e/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

valid_prefix() {
  # Namespace names: letters, digits and dashes; short enough for messages.
  [[ "$1" =~ ^[a-z][a-z0-9-]{0,23}$ ]] || die "invalid prefix '$1' (lower-case letters, digits, -)"
}

check() {
  [ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces)"; return 1; }
  command -v ip >/dev/null || { echo "ip (iproute2) is not installed: scripts/deps.sh"; return 1; }
  command -v tc >/dev/null || { echo "tc (iproute2) is not installed: scripts/deps.sh"; return 1; }
  local probe="wcprobe-$$"
  ip netns add "$probe" 2>/dev/null || { echo "cannot create network namespaces (ip netns add)"; return 1; }
  ip netns del "$probe" 2>/dev/null || true
}

hosts_of() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-(h[0-9]+|sw)\$" || true; }

down() {
  local prefix=$1 ns pids
  for ns in $(hosts_of "$prefix"); do
    # Processes left in the namespace keep it alive: end them first.
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -f "$STATE/$prefix.owner"
}

up() {
  local prefix=$1 k=$2 rate=${3:-}
  [ "$rate" = 0 ] && rate=""
  case "$k" in '' | *[!0-9]* | 0) die "K must be a positive number" ;; esac
  [ "$k" -le 200 ] || die "at most 200 hosts"
  down "$prefix"
  trap 'down "$prefix"' ERR
  mkdir -p "$STATE"
  echo "${WEFT_CLUSTER_OWNER:-$PPID}" >"$STATE/$prefix.owner"
  local sw="$prefix-sw"
  ip netns add "$sw"
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  ip -n "$sw" link set lo up
  for i in $(seq 1 "$k"); do
    local h="$prefix-h$i"
    ip netns add "$h"
    ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$h"
    ip -n "$sw" link set "p$i" master br0
    ip -n "$sw" link set "p$i" up
    ip -n "$h" addr add "10.77.0.$i/24" dev eth0
    ip -n "$h" link set eth0 up
    ip -n "$h" link set lo up
    if [ -n "$rate" ]; then
      ip netns exec "$h" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
      ip netns exec "$sw" tc qdisc add dev "p$i" root tbf rate "$rate" burst 256kb latency 100ms
    fi
  done
  # With ping at hand, wait until every host reaches host 1 (a bridge
  # without STP forwards at once; this guards against slow links).
  if command -v ping >/dev/null; then
    for i in $(seq 2 "$k"); do
      local ok=0
      for _ in $(seq 1 50); do
        if ip netns exec "$prefix-h$i" ping -c1 -W1 10.77.0.1 >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
      done
      [ $ok = 1 ] || die "host $i cannot reach host 1"
    done
  fi
  trap - ERR
}

gc() {
  [ -d "$STATE" ] || return 0
  local f prefix owner
  for f in "$STATE"/*.owner; do
    [ -e "$f" ] || continue
    prefix=$(basename "$f" .owner)
    owner=$(cat "$f" 2>/dev/null || echo 0)
    if ! kill -0 "$owner" 2>/dev/null; then down "$prefix"; fi
  done
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
check) check ;;
up)
  [ $# -ge 2 ] || usage
  valid_prefix "$1"
  msg=$(check) || die "$msg"
  up "$@"
  ;;
down)
  [ $# -eq 1 ] || usage
  valid_prefix "$1"
  down "$1"
  ;;
exec)
  [ $# -ge 3 ] || usage
  valid_prefix "$1"
  ns="$1-h$2"
  shift 2
  exec ip netns exec "$ns" "$@"
  ;;
kill)
  [ $# -eq 2 ] || usage
  valid_prefix "$1"
  pids=$(ip netns pids "$1-h$2" 2>/dev/null || true)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  ;;
link)
  [ $# -eq 3 ] || usage
  valid_prefix "$1"
  case "$3" in up | down) ;; *) usage ;; esac
  ip -n "$1-h$2" link set eth0 "$3"
  ip -n "$1-sw" link set "p$2" "$3"
  ;;
addr)
  [ $# -eq 1 ] || usage
  echo "10.77.0.$1"
  ;;
gc) gc ;;
run)
  prefix="wc$$"
  rate=""
  while [ $# -gt 0 ]; do
    case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    *) break ;;
    esac
  done
  [ $# -ge 3 ] && [ "$2" = "--" ] || usage
  k=$1
  shift 2
  valid_prefix "$prefix"
  msg=$(check) || die "$msg"
  gc
  trap 'down "$prefix"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  WEFT_CLUSTER_OWNER=$$ up "$prefix" "$k" "$rate"
  code=0
  WEFT_CLUSTER_PREFIX=$prefix WEFT_CLUSTER_HOSTS=$k WEFT_CLUSTER_SCRIPT=$SELF "$@" || code=$?
  exit $code
  ;;
*) usage ;;
esac
