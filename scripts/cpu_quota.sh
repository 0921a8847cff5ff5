#!/usr/bin/env bash
# CPU quotas through cgroups, for the load-balancing benchmark and tests: a
# process in a group with a quota of P% gets at most P% of one core, a real
# straggler (not a sleep). Needs root.
#
#   cpu_quota.sh check                    exit 0 if quotas can be set here, else say why
#   cpu_quota.sh create NAME PERCENT      make group NAME (or reuse it) with that quota
#   cpu_quota.sh set NAME PERCENT         change the quota of NAME (also while it runs)
#   cpu_quota.sh exec NAME [--if-rank R] -- CMD [ARG...]
#       move this process into NAME, then exec CMD; with --if-rank R only when
#       $WEFT_RANK is R (otherwise CMD runs unconfined), so that
#         weft run -n 4 -- scripts/cpu_quota.sh exec slow --if-rank 3 -- PROG ARGS
#       throttles rank 3 only
#   cpu_quota.sh stat NAME                "quota_percent nr_periods nr_throttled throttled_s"
#   cpu_quota.sh remove NAME              move its processes to the parent group, remove it
#
# PERCENT is a percentage of one core: a number from 1 (e.g. 25 or 12.5);
# 100 or "max" means no quota; above 100 allows several cores (250: 2.5).
# cgroup v1: the cpu controller's group /sys/fs/cgroup/cpu/NAME,
# cpu.cfs_period_us 100000 and cpu.cfs_quota_us PERCENT x 1000 (-1 for no
# quota). Where no v1 cpu controller is mounted, cgroup v2: the group
# /sys/fs/cgroup/NAME, cpu.max "PERCENT x 1000 100000" ("max 100000").
# CPU_QUOTA_ROOT=DIR uses DIR as the parent group instead.
# NAME: letters, digits, '.', '_' and '-'. Exit codes: 0 done, 1 failed
# (not root, no cgroup hierarchy, no such group...), 2 usage error.
set -euo pipefail

SELF=$(readlink -f "$0")
PERIOD_US=100000

die() { echo "cpu_quota.sh: $*" >&2; exit 1; }
usage_error() {
  echo "cpu_quota.sh: $*" >&2
  echo "usage: cpu_quota.sh check | create NAME PERCENT | set NAME PERCENT |" \
    "exec NAME [--if-rank R] -- CMD [ARG...] | stat NAME | remove NAME (see the header of $SELF)" >&2
  exit 2
}

# The parent group and its cgroup version: sets ROOT and VERSION (1 or 2),
# or prints why there is none and returns 1.
find_root() {
  local dir
  if [ -n "${CPU_QUOTA_ROOT:-}" ]; then
    dir=$CPU_QUOTA_ROOT
    if [ -f "$dir/cpu.cfs_quota_us" ]; then
      ROOT=$dir VERSION=1
    elif [ -f "$dir/cgroup.controllers" ]; then
      ROOT=$dir VERSION=2
    else
      echo "CPU_QUOTA_ROOT=$dir is not a cgroup v1 cpu group nor a cgroup v2 group"
      return 1
    fi
    return 0
  fi
  if [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    ROOT=/sys/fs/cgroup/cpu VERSION=1
    return 0
  fi
  for dir in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    if [ -f "$dir/cgroup.controllers" ] && grep -qw cpu "$dir/cgroup.controllers"; then
      ROOT=$dir VERSION=2
      return 0
    fi
  done
  echo "no cgroup cpu controller: neither /sys/fs/cgroup/cpu (v1) nor a cgroup v2 hierarchy" \
    "with the cpu controller under /sys/fs/cgroup"
  return 1
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root to change cgroups (running as uid $(id -u))"
  local why
  why=$(find_root) || die "$why"
  find_root >/dev/null
}

valid_name() {
  [[ "$1" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$ ]] ||
    usage_error "invalid group name '$1' (letters, digits, '.', '_', '-'; up to 64)"
}

# PERCENT to the quota in microseconds per period ("max" for none).
quota_of() {
  local p=$1
  if [ "$p" = max ]; then echo max; return; fi
  [[ "$p" =~ ^[0-9]{1,6}(\.[0-9]{1,3})?$ ]] ||
    usage_error "invalid percent '$p' (a number of percent of one core from 1, or 'max')"
  local us
  us=$(awk -v p="$p" -v period="$PERIOD_US" 'BEGIN { printf "%d", p * period / 100 + 0.5 }')
  [ "$us" -ge $((PERIOD_US / 100)) ] || usage_error "invalid percent '$p': below 1% of a core"
  if [ "$us" -eq "$PERIOD_US" ]; then echo max; else echo "$us"; fi
}

group_dir() { echo "$ROOT/$1"; }

existing_group() {
  local dir
  dir=$(group_dir "$1")
  [ -d "$dir" ] || die "no cgroup '$1' ($dir): make it with 'cpu_quota.sh create $1 PERCENT'"
  echo "$dir"
}

write_quota() {  # write_quota DIR QUOTA_US|max
  local dir=$1 q=$2
  if [ "$VERSION" = 1 ]; then
    echo "$PERIOD_US" >"$dir/cpu.cfs_period_us" || die "cannot set $dir/cpu.cfs_period_us"
    if [ "$q" = max ]; then q=-1; fi
    echo "$q" >"$dir/cpu.cfs_quota_us" || die "cannot set $dir/cpu.cfs_quota_us to $q"
  else
    echo "$q $PERIOD_US" >"$dir/cpu.max" || die "cannot set $dir/cpu.max to '$q $PERIOD_US'"
  fi
}

cmd_check() {
  [ "$(id -u)" -eq 0 ] || { echo "needs root to change cgroups"; return 1; }
  local why probe
  why=$(find_root) || { echo "$why"; return 1; }
  find_root >/dev/null
  probe="$ROOT/cpu-quota-probe-$$"
  mkdir "$probe" 2>/dev/null || { echo "cannot make a group under $ROOT"; return 1; }
  if [ "$VERSION" = 2 ] && [ ! -f "$probe/cpu.max" ]; then
    echo "+cpu" >"$ROOT/cgroup.subtree_control" 2>/dev/null || true
  fi
  if ! (write_quota "$probe" 50000) 2>/dev/null; then
    rmdir "$probe"
    echo "cannot set a CPU quota under $ROOT"
    return 1
  fi
  rmdir "$probe"
  echo "cgroup v$VERSION at $ROOT"
}

cmd_create() {
  local name=$1 q dir
  q=$(quota_of "$2")
  need_root
  dir=$(group_dir "$name")
  if [ ! -d "$dir" ]; then
    mkdir "$dir" || die "cannot make $dir"
  fi
  if [ "$VERSION" = 2 ] && [ ! -f "$dir/cpu.max" ]; then
    echo "+cpu" >"$ROOT/cgroup.subtree_control" ||
      die "cannot enable the cpu controller in $ROOT/cgroup.subtree_control"
  fi
  write_quota "$dir" "$q"
}

cmd_set() {
  local name=$1 q dir
  q=$(quota_of "$2")
  need_root
  dir=$(existing_group "$name")
  write_quota "$dir" "$q"
}

cmd_exec() {
  local name=$1 rank="" dir
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --if-rank)
        [ $# -ge 2 ] || usage_error "--if-rank needs a rank"
        [[ "$2" =~ ^[0-9]+$ ]] || usage_error "--if-rank: '$2' is not a rank (0, 1, ...)"
        rank=$2
        shift 2 ;;
      --) shift; break ;;
      *) usage_error "exec: unexpected '$1' (put '--' before the command)" ;;
    esac
  done
  [ $# -ge 1 ] || usage_error "exec: no command after '--'"
  if [ -n "$rank" ] && [ "${WEFT_RANK:-}" != "$rank" ]; then
    exec "$@"
  fi
  need_root
  dir=$(existing_group "$name")
  echo $$ >"$dir/cgroup.procs" || die "cannot move process $$ into $dir"
  exec "$@"
}

cmd_stat() {
  local name=$1 dir q periods throttled ns
  need_root
  dir=$(existing_group "$name")
  if [ "$VERSION" = 1 ]; then
    q=$(cat "$dir/cpu.cfs_quota_us")
    if [ "$q" -lt 0 ]; then q=max; else q=$(awk -v q="$q" -v p="$(cat "$dir/cpu.cfs_period_us")" \
      'BEGIN { printf "%g", 100 * q / p }'); fi
    periods=$(awk '$1 == "nr_periods" { print $2 }' "$dir/cpu.stat")
    throttled=$(awk '$1 == "nr_throttled" { print $2 }' "$dir/cpu.stat")
    ns=$(awk '$1 == "throttled_time" { print $2 }' "$dir/cpu.stat")
    echo "$q $periods $throttled $(awk -v n="$ns" 'BEGIN { printf "%.3f", n / 1e9 }')"
  else
    read -r q p <"$dir/cpu.max"
    if [ "$q" != max ]; then q=$(awk -v q="$q" -v p="$p" 'BEGIN { printf "%g", 100 * q / p }'); fi
    periods=$(awk '$1 == "nr_periods" { print $2 }' "$dir/cpu.stat")
    throttled=$(awk '$1 == "nr_throttled" { print $2 }' "$dir/cpu.stat")
    ns=$(awk '$1 == "throttled_usec" { print $2 }' "$dir/cpu.stat")
    echo "$q ${periods:-0} ${throttled:-0} $(awk -v n="${ns:-0}" 'BEGIN { printf "%.3f", n / 1e6 }')"
  fi
}

cmd_remove() {
  local name=$1 dir parent pid pids
  need_root
  dir=$(group_dir "$name")
  [ -d "$dir" ] || die "no cgroup '$name' ($dir)"
  parent=$(dirname "$dir")
  # Processes may fork or exit meanwhile: move what is there, a few times.
  # (cgroup files show size 0: read them, do not test -s.)
  for _ in 1 2 3 4 5; do
    pids=$(cat "$dir/cgroup.procs")
    [ -n "$pids" ] || break
    for pid in $pids; do
      echo "$pid" >"$parent/cgroup.procs" 2>/dev/null || true
    done
  done
  rmdir "$dir" 2>/dev/null ||
    die "cannot remove $dir (processes still in it: $(tr '\n' ' ' <"$dir/cgroup.procs"))"
}

[ $# -ge 1 ] || usage_error "no command"
cmd=$1
shift
case "$cmd" in
  check) [ $# -eq 0 ] || usage_error "check takes no arguments"; cmd_check ;;
  create|set)
    [ $# -eq 2 ] || usage_error "$cmd takes NAME PERCENT"
    valid_name "$1"
    "cmd_$cmd" "$1" "$2" ;;
  exec)
    [ $# -ge 1 ] || usage_error "exec takes NAME [--if-rank R] -- CMD..."
    valid_name "$1"
    cmd_exec "$@" ;;
  stat|remove)
    [ $# -eq 1 ] || usage_error "$cmd takes NAME"
    valid_name "$1"
    "cmd_$cmd" "$1" ;;
  -h|--help|help) sed -n '2,/^set -e/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) usage_error "unknown command '$cmd'" ;;
esac
