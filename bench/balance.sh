#!/usr/bin/env bash
# Load balancing (issue 12): 4 workers of examples/fashion_mnist on this
# machine, one of them slowed down, measured side by side in one run
# (../shared/guide/MEASURING.md): every round runs every setting once, in the
# same order (A B C ... A B C ...), and the report gives each setting's
# median over the rounds and ratios of the medians. Needs root (cgroups,
# through scripts/cpu_quota.sh). Prints a Markdown report on stdout, progress
# on stderr.
#
# a) Worker 3 of 4 throttled to 25% of a core by a cgroup CPU quota:
#      weft --balance dynamic, weft --balance none (equal shares: BSP at the
#      pace of the slowest), weft --balance static (shares from the start-up
#      probe), PyTorch DDP (../shared/anchors/torch_ddp_fmnist.py through
#      run_anchors.sh, 4 processes in its --rank mode, rank 3 in the same
#      cgroup), and the ideal: 4 independent single-worker processes (weft run
#      -n 1 fashion_mnist --balance none) at the same time, the 4th one
#      throttled the same way, their samples/s summed (the no-communication
#      ceiling of MEASURING.md under the same throttle). samples/s and the
#      ratio to the ideal.
# b) The quota of worker 3 changed while a --balance dynamic job trains:
#    100% -> 25% after T1 s, back to 100% after T2 s, stopped at T3 s. From
#    the job's replan events ({"event": "replan", "step", "shares", "rates"})
#    and its progress line (the step clock): how many steps worker 3's share
#    took to cover 90% of the way to where it settled after each change
#    (target: within 20), and whether its changes die out (direction changes
#    of worker 3's share after it settled; 0 or 1 means no oscillation).
# c) Equal workers, nothing throttled: dynamic against none (target: dynamic
#    costs at most 2%).
# d) A CPU hog beside worker 3: a busy loop (one thread) in the same cgroup as
#    worker 3, with no quota on the group. Under the kernel's fair scheduler a
#    cgroup weighs as much as one process of the parent group, so worker 3 and
#    the hog share what worker 3 alone would get, as a worker shares its host
#    with another program; the other workers are untouched. The capacity the
#    hog takes is its CPU time over (cores x the job's wall time); the job's
#    slowdown is 1 - samples/s with the hog / samples/s of the same mode in
#    (c) of the same round. Target (dynamic): slowdown no more than in
#    proportion, slowdown / capacity taken <= 1. --balance none shown too,
#    and the same figures for the ideal (4 independent single-worker
#    processes, the 4th beside the hog, against 4 with nothing beside them,
#    both run in (c) and (d)): how far the machine itself is from
#    "in proportion" when 4 workers and a hog share its cores.
# --accuracy (long, off by default): test accuracy on the full test set after
#    --acc-epochs (5) epochs of a throttled --balance dynamic job (worker 3 at
#    25%) against an unthrottled one, seeds --acc-seeds ("0 1 2"), the two
#    alternating; the job's default hyper-parameters; median per setting and
#    the difference (target: within 0.5 percentage points).
#
# Every run: batch 64 per worker (global 256), SGD lr 0.05 momentum 0.9,
# constant schedule, one intra-op thread per worker, --max-steps STEPS of one
# epoch (samples/s after the first 20 steps, as MEASURING.md; DDP's figure
# is over all its steps, compared with Weft's whole-run figure), a 1000-sample
# test set. Before each run the script waits (up to --quiet-wait s) until the
# CPUs are 90% idle for a second, and reports the share of the machine's CPU
# time that other processes took during each run ("foreign").
#
# Usage: bench/balance.sh [--rounds N] [--steps S] [--quick] [--weft BUILD_DIR]
#          [--anchors DIR] [--quiet-wait S] [--phases T1,T2,T3] [--only a,b,c,d]
#          [--accuracy] [--acc-epochs E] [--acc-seeds "0 1 2"] [--legacy] [--keep DIR]
#          [--b-workers N]
# Defaults: 3 rounds, 120 steps, phases 12,30,48 s, build/ of this checkout,
# ../shared/anchors. About 20 minutes on 2 cores. --quick: one round of 40
# steps, phases 6,14,22 (a smoke test). --legacy: the build's fashion_mnist
# has no --balance flag (test this script only: every weft setting is then
# equal-share BSP). --keep DIR: copy the raw results (logs, per-run figures)
# to DIR at the end, for bench/balance_report.py DIR to read again.
# --b-workers N: workers of scenario b's job (default 4; its last rank is the
# one whose quota changes). 2 gives each worker a core of a 2-core machine:
# the planner without the noise of oversubscribed cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=3
steps=120
phases=12,30,48
quiet_wait=30
build="$root/build"
anchors="$root/../shared/anchors"
only=a,b,c,d
accuracy=0
acc_epochs=5
acc_seeds="0 1 2"
legacy=0
quick=0
keep=""
b_workers=4
usage_error() { echo "balance.sh: $*" >&2; echo "see bench/balance.sh --help" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] || usage_error "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) need_arg "$@"; rounds=$2; shift 2 ;;
    --steps) need_arg "$@"; steps=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --weft|--build) need_arg "$@"; build=$2; shift 2 ;;
    --anchors) need_arg "$@"; anchors=$2; shift 2 ;;
    --quiet-wait) need_arg "$@"; quiet_wait=$2; shift 2 ;;
    --phases) need_arg "$@"; phases=$2; shift 2 ;;
    --only) need_arg "$@"; only=$2; shift 2 ;;
    --accuracy) accuracy=1; shift ;;
    --acc-epochs) need_arg "$@"; acc_epochs=$2; shift 2 ;;
    --acc-seeds) need_arg "$@"; acc_seeds=$2; shift 2 ;;
    --legacy) legacy=1; shift ;;
    --keep) need_arg "$@"; keep=$2; shift 2 ;;
    --b-workers) need_arg "$@"; b_workers=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown argument $1" ;;
  esac
done
if [ "$quick" = 1 ]; then
  rounds=1 steps=40 phases=6,14,22 acc_epochs=1 acc_seeds=0
fi
posint() { [[ "$2" =~ ^[1-9][0-9]{0,5}$ ]] || usage_error "$1 must be a positive integer, not '$2'"; }
posint --rounds "$rounds"
posint --steps "$steps"
posint --acc-epochs "$acc_epochs"
[[ "$b_workers" =~ ^([2-9]|[1-5][0-9]|6[0-4])$ ]] || usage_error "--b-workers must be 2..64"
[[ "$quiet_wait" =~ ^[0-9]{1,5}$ ]] || usage_error "--quiet-wait must be a number of seconds"
[[ "$phases" =~ ^[0-9]+(\.[0-9]+)?,[0-9]+(\.[0-9]+)?,[0-9]+(\.[0-9]+)?$ ]] ||
  usage_error "--phases must be T1,T2,T3 (seconds)"
IFS=, read -r t1 t2 t3 <<<"$phases"
awk -v a="$t1" -v b="$t2" -v c="$t3" 'BEGIN { exit !(0 < a && a < b && b < c) }' ||
  usage_error "--phases: need 0 < T1 < T2 < T3"
[[ "$only" =~ ^[abcd](,[abcd])*$ ]] || usage_error "--only takes letters a,b,c,d"
[[ "$acc_seeds" =~ ^[0-9]+( [0-9]+)*$ ]] || usage_error "--acc-seeds takes seeds like \"0 1 2\""
want() { [[ ",$only," == *",$1,"* ]]; }
if want d && ! want c; then only="$only,c"; fi  # (d) compares with (c) of the same round

weft="$build/bin/weft"
job="$build/bin/fashion_mnist"
cq="$root/scripts/cpu_quota.sh"
drive="$root/bench/balance_drive.py"
for f in "$weft" "$job"; do
  [ -x "$f" ] || { echo "balance.sh: $f is missing (build fashion_mnist with libtorch)" >&2; exit 1; }
done
# (The help is read whole first: grep -q stopping early would kill the job
# with SIGPIPE, which pipefail reports as a missing flag.)
job_help=$("$job" --help 2>/dev/null || true)
if [ "$legacy" = 0 ] && ! grep -q -- --balance <<<"$job_help"; then
  echo "balance.sh: $job has no --balance flag (a build from before issue 12?);" \
    "--legacy runs the script with equal shares everywhere, to test it" >&2
  exit 1
fi
if want a; then
  [ -x "$anchors/run_anchors.sh" ] || { echo "balance.sh: $anchors/run_anchors.sh is missing" >&2; exit 1; }
fi
why=$("$cq" check) || { echo "balance.sh: cannot set CPU quotas here: $why" >&2; exit 1; }

cores=$(nproc)
cpu_model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
common=(--epochs 1 --batch-size 64 --lr 0.05 --lr-schedule constant --warmup-epochs 0
        --momentum 0.9 --threads 1 --max-steps "$steps" --test-samples 1000 --json)
bal() { [ "$legacy" = 1 ] || echo "--balance $1"; }  # word-split on purpose

out=$(mktemp -d)
autogroup_was=-  # set below, restored by cleanup
slow="wb$$-slow"  # worker 3 at 25% (a), the changing quota (b), accuracy
hog="wb$$-hog"    # worker 3 and the hog (d)
# Every process below this script (launchers, their workers, DDP ranks, the
# hog), deepest first, by pid.
descendants() {
  local c
  for c in $(pgrep -P "$1" || true); do
    descendants "$c"
    echo "$c"
  done
}
cleanup() {
  local p g f left
  trap - INT TERM HUP
  if [ "$autogroup_was" = 1 ]; then echo 1 >"$autogroup" 2>/dev/null || true; fi
  left=$(descendants $$)
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    kill -TERM $left 2>/dev/null || true
    sleep 1
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
  fi
  for g in "$slow" "$hog"; do
    for f in "/sys/fs/cgroup/cpu/$g/cgroup.procs" "/sys/fs/cgroup/$g/cgroup.procs"; do
      [ -f "$f" ] || continue
      while read -r p; do
        kill -KILL "$p" 2>/dev/null || true  # stragglers in our groups are ours
      done <"$f"
    done
    "$cq" remove "$g" 2>/dev/null || true
  done
  if [ -n "$keep" ]; then
    mkdir -p "$keep" && cp -r "$out"/. "$keep"/ && echo "balance.sh: raw results kept in $keep" >&2
  fi
  rm -rf "$out"
}
trap cleanup EXIT
trap 'echo "balance.sh: interrupted" >&2; exit 130' INT TERM HUP

# The kernel's autogroup (sched_autogroup_enabled) puts every process of a
# session in one scheduling group: the job's workers, all in the launcher's
# session, would then weigh as much together as the hog's cgroup alone, and
# (d)'s hog would take half the machine instead of half of worker 3's
# share. It is switched off while the script runs, and back on at the end.
autogroup=/proc/sys/kernel/sched_autogroup_enabled
autogroup_was=$(cat "$autogroup" 2>/dev/null || echo -)
if [ "$autogroup_was" = 1 ]; then
  echo 0 >"$autogroup" || { echo "balance.sh: cannot switch off $autogroup" >&2; exit 1; }
  echo "balance.sh: sched_autogroup_enabled is 0 until the script ends" >&2
fi

"$cq" create "$slow" 25 >/dev/null
"$cq" create "$hog" max >/dev/null

# ---- Measuring ------------------------------------------------------------
. "$(dirname "$0")/quiet.sh"  # busy, wait_quiet, measure_start
# measure_start; run; measure_end RUSAGE_FILES... [+SECONDS]: sets $foreign,
# the share of the machine's CPU time that other processes took meanwhile.
measure_end() {
  local b1 t1 ours extra=0 f files=()
  b1=$(busy); t1=$(date +%s.%N)
  for f in "$@"; do
    case "$f" in +*) extra=${f#+} ;; *) files+=("$f") ;; esac
  done
  ours=$(cat "${files[@]}" | awk -v e="$extra" '{ s += $1 + $2 } END { print s + e }')
  wall=$(python3 -c "print('%.2f' % ($t1 - $t0))")
  foreign=$(python3 -c "w = $t1 - $t0; f = ($b1 - $b0) / $hz - $ours; print('%.3f' % max(0.0, f / (w * $cores)))")
}
# Commands run in the background and are waited for, so that a signal to the
# script runs its trap (cleanup) at once rather than after the command.
timed() {  # timed RUSAGE_FILE OUTPUT_FILE CMD...
  local ru=$1 log=$2
  shift 2
  /usr/bin/time -f "%U %S" -o "$ru" "$@" >"$log" 2>&1 &
  wait $!
}
waited() { "$@" & wait $!; }
fail() {  # fail LOG WHAT
  echo "balance.sh: $2 failed; its output:" >&2
  tail -n 30 "$1" >&2
  exit 1
}
# "samples_per_s samples_per_s_all" of the last epoch in a weft --json output.
weft_rate() {
  python3 -c '
import json, sys
rows = [json.loads(l[l.index("{"):]) for l in open(sys.argv[1]) if "{" in l and "samples_per_s" in l]
print("%.1f %.1f" % (rows[-1]["samples_per_s"], rows[-1]["samples_per_s_all"]))' "$1"
}
# The last epoch's "shares" of a weft --json output, as "a/b/c/d" ("-" if none).
weft_shares() {
  python3 -c '
import json, sys
rows = [json.loads(l[l.index("{"):]) for l in open(sys.argv[1]) if "{" in l and "samples_per_s" in l]
print("/".join(str(s) for s in rows[-1].get("shares", [])) or "-")' "$1"
}
hog_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# thr_start; run; thr_end: sets $thr, the share of the quota periods of the
# group $slow in which it was throttled (did the quota bind, or was the
# machine so busy that worker 3 got less than its quota anyway?).
thr_start() { read -r _ thr_p0 thr_n0 _ < <("$cq" stat "$slow"); }
thr_end() {
  local p1 n1
  read -r _ p1 n1 _ < <("$cq" stat "$slow")
  thr=$(awk -v p=$((p1 - thr_p0)) -v n=$((n1 - thr_n0)) 'BEGIN { printf "%.3f", (p > 0 ? n / p : 0) }')
}

results="$out/results.txt"  # KEY ROUND FOREIGN RATE RATE_ALL [EXTRA...]
: >"$results"
record() { echo "$*" >>"$results"; echo "  $*" >&2; }

# One 4-worker weft job; rank 3 in cgroup $3 ("" for none).
weft4() {  # weft4 KEY MODE GROUP ROUND
  local key=$1 mode=$2 group=$3 r=$4 log="$out/$1-$4.txt" wrap=()
  [ -n "$group" ] && wrap=("$cq" exec "$group" --if-rank 3 --)
  wait_quiet; measure_start; thr_start
  # shellcheck disable=SC2046
  timed "$out/ru" "$log" "$weft" run -n 4 -- "${wrap[@]}" "$job" "${common[@]}" $(bal "$mode") ||
    fail "$log" "$key (round $r)"
  measure_end "$out/ru"; thr_end
  [ -n "$group" ] || thr=-
  record "$key $r $foreign $(weft_rate "$log") $(weft_shares "$log") $thr"
}

# The ideal: 4 single-worker processes at once, the 4th in cgroup GROUP
# ("" for none): (a) the 4th throttled; (c) none; (d) the 4th beside the hog
# (HOG=1: a busy loop in GROUP while they run; the last field is then the
# hog's share of the machine, as in hogged()).
ideal() {  # ideal KEY ROUND GROUP HOG
  local key=$1 r=$2 group=$3 with_hog=$4 i ps=() wrap hp="" h0 h1 hog_s=0 last
  wait_quiet
  if [ "$with_hog" = 1 ]; then
    "$cq" exec "$group" -- bash -c 'while :; do :; done' &
    hp=$!
    sleep 0.2
    h0=$(hog_ticks "$hp")
  fi
  measure_start; thr_start
  for i in 0 1 2 3; do
    wrap=()
    [ "$i" = 3 ] && [ -n "$group" ] && wrap=("$cq" exec "$group" --)
    # shellcheck disable=SC2046
    # (--compress none: a single worker sends nothing, and auto->none at
    # one worker trains about 2x slower here; see BENCHMARKS.md.)
    timed "$out/ru$i" "$out/$key$i-$r.txt" "$weft" run -n 1 -- "${wrap[@]}" "$job" "${common[@]}" \
      --seed "$i" $(bal none) --compress none &
    ps+=($!)
  done
  for i in 0 1 2 3; do
    wait "${ps[$i]}" || { [ -z "$hp" ] || kill "$hp"; fail "$out/$key$i-$r.txt" "$key process $i (round $r)"; }
  done
  if [ -n "$hp" ]; then
    h1=$(hog_ticks "$hp")
    kill "$hp"; wait "$hp" 2>/dev/null || true
    hog_s=$(python3 -c "print('%.2f' % (($h1 - $h0) / $hz))")
  fi
  measure_end "$out/ru0" "$out/ru1" "$out/ru2" "$out/ru3" "+$hog_s"; thr_end
  if [ -n "$hp" ]; then
    last=$(python3 -c "print('%.4f' % ($hog_s / ($wall * $cores)))")
  elif [ "$group" = "$slow" ]; then
    last=$thr
  else
    last=-
  fi
  local rates=()
  for i in 0 1 2 3; do rates+=("$(weft_rate "$out/$key$i-$r.txt")"); done
  record "$key $r $foreign $(python3 -c '
import sys
v = [tuple(map(float, s.split())) for s in sys.argv[1:]]
print("%.1f %.1f %s" % (sum(a for a, _ in v), sum(b for _, b in v), "/".join("%.0f" % a for a, _ in v)))' "${rates[@]}") $last"
}

# (a) PyTorch DDP, 4 processes, rank 3 throttled.
ddp() {  # ddp ROUND
  local r=$1 i ps=() wrap port
  port=$((20000 + ($$ * 7 + r * 13) % 20000))
  wait_quiet; measure_start; thr_start
  for i in 0 1 2 3; do
    wrap=()
    [ "$i" = 3 ] && wrap=("$cq" exec "$slow" --)
    timed "$out/ru$i" "$out/ddp$i-$r.txt" "${wrap[@]}" "$anchors/run_anchors.sh" ddp --world 4 \
      --rank "$i" --port "$port" --model cnn --epochs 1 --batch 64 --lr 0.05 --threads 1 \
      --max-steps "$steps" &
    ps+=($!)
  done
  for i in 0 1 2 3; do
    wait "${ps[$i]}" || fail "$out/ddp$i-$r.txt" "DDP rank $i (round $r)"
  done
  measure_end "$out/ru0" "$out/ru1" "$out/ru2" "$out/ru3"; thr_end
  local rate
  rate=$(awk '/samples\/s/ { for (i = 1; i < NF; ++i) if ($i == "samples/s") v = $(i + 1) } END { print v }' "$out/ddp0-$r.txt")
  [ -n "$rate" ] || fail "$out/ddp0-$r.txt" "DDP (round $r): no samples/s"
  record "a_ddp $r $foreign $rate $rate - $thr"
}

# (b) dynamic job, the quota of worker 3 changed while it trains.
changing() {  # changing ROUND
  local r=$1 log="$out/b-$1.log"
  "$cq" set "$slow" max
  wait_quiet
  # shellcheck disable=SC2046
  waited python3 "$drive" "$log" "$cq" "$slow" "$t1" 25 "$t2" max "$t3" -- \
    "$weft" run --no-prefix -n "$b_workers" -- "$cq" exec "$slow" --if-rank $((b_workers - 1)) -- "$job" \
    --epochs 1000 --batch-size 64 --lr 0.05 --lr-schedule constant --warmup-epochs 0 \
    --momentum 0.9 --threads 1 --test-samples 1000 --json $(bal dynamic) ||
    fail "$log" "the changing-quota run (round $r)"
  "$cq" set "$slow" 25
  cp "$log" "$out/keep-b-$r.log"
  echo "  b $r: $(grep -c '"replan"' "$log" || true) replan events" >&2
}

# (d) a hog in worker 3's cgroup.
hogged() {  # hogged KEY MODE ROUND
  local key=$1 mode=$2 r=$3 log="$out/$1-$3.txt" hp h0 h1
  wait_quiet
  "$cq" exec "$hog" -- bash -c 'while :; do :; done' &
  hp=$!
  sleep 0.2
  h0=$(hog_ticks "$hp"); measure_start
  # shellcheck disable=SC2046
  timed "$out/ru" "$log" "$weft" run -n 4 -- "$cq" exec "$hog" --if-rank 3 -- "$job" "${common[@]}" \
    $(bal "$mode") || { kill "$hp"; fail "$log" "$key (round $r)"; }
  h1=$(hog_ticks "$hp")
  kill "$hp"; wait "$hp" 2>/dev/null || true
  local hog_s
  hog_s=$(python3 -c "print('%.2f' % (($h1 - $h0) / $hz))")
  measure_end "$out/ru" "+$hog_s"
  record "$key $r $foreign $(weft_rate "$log") $(weft_shares "$log") $(python3 -c \
    "print('%.4f' % ($hog_s / ($wall * $cores)))")"
}

echo "balance.sh: $rounds round(s) of $steps steps, scenarios $only, build $build," \
  "$cores x $cpu_model" >&2
start_s=$(date +%s)
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds ($(($(date +%s) - start_s)) s)" >&2
  if want a; then
    weft4 a_dynamic dynamic "$slow" "$r"
    weft4 a_none none "$slow" "$r"
    weft4 a_static static "$slow" "$r"
    ddp "$r"
    ideal a_ideal "$r" "$slow" 0
  fi
  want b && changing "$r"
  if want c; then
    weft4 c_dynamic dynamic "" "$r"
    weft4 c_none none "" "$r"
    want d && ideal c_ideal "$r" "" 0
  fi
  if want d; then
    hogged d_dynamic dynamic "$r"
    hogged d_none none "$r"
    ideal d_ideal "$r" "$hog" 1
  fi
done

if [ "$accuracy" = 1 ]; then
  "$cq" set "$slow" 25
  for seed in $acc_seeds; do
    for setting in throttled unthrottled; do
      wrap=()
      [ "$setting" = throttled ] && wrap=("$cq" exec "$slow" --if-rank 3 --)
      log="$out/acc-$setting-$seed.txt"
      echo "== accuracy: $setting, seed $seed ($(($(date +%s) - start_s)) s)" >&2
      # shellcheck disable=SC2046
      timed "$out/ru" "$log" "$weft" run -n 4 -- "${wrap[@]}" "$job" --json --epochs "$acc_epochs" \
        --seed "$seed" --threads 1 $(bal dynamic) || fail "$log" "accuracy run ($setting, seed $seed)"
      record "acc_$setting $seed 0 $(python3 -c '
import json, sys
rows = [json.loads(l[l.index("{"):]) for l in open(sys.argv[1]) if "{" in l and "test_accuracy" in l]
print("%.4f %.4f" % (rows[-1]["test_accuracy"], rows[-1]["test_accuracy"]))' "$log")"
    done
  done
fi
total_s=$(($(date +%s) - start_s))

python3 -c '
import json, sys
k = ["rounds", "steps", "cores", "legacy", "total_s", "t1", "t2", "t3", "acc_epochs", "b_workers"]
meta = dict(zip(k, map(float, sys.argv[1:11])))
meta.update(cpu=sys.argv[11], build=sys.argv[12], autogroup=sys.argv[13])
json.dump(meta, open(sys.argv[14], "w"))' "$rounds" "$steps" "$cores" "$legacy" "$total_s" "$t1" "$t2" \
  "$t3" "$acc_epochs" "$b_workers" "$cpu_model" "$build" "$autogroup_was" "$out/meta.json"
python3 "$root/bench/balance_report.py" "$out"
