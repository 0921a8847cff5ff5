# Sourced by the benchmark scripts: waiting for a quiet machine before a run
# and measuring how much CPU other processes took during it
# (../shared/guide/MEASURING.md). Needs $quiet_wait (seconds to wait at
# most) and $cores set by the script.
hz=$(getconf CLK_TCK)
# Busy CPU time of the whole machine so far, in ticks.
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
# Waits until a second passes with the machine under 10% busy, at most
# $quiet_wait seconds.
wait_quiet() {
  local waited=0 a b
  while [ "$waited" -lt "$quiet_wait" ]; do
    a=$(busy); sleep 1; b=$(busy); waited=$((waited + 1))
    [ $((b - a)) -le $((hz * cores / 10)) ] && return 0
  done
  echo "  (the machine did not get quiet within ${quiet_wait}s: measuring anyway)" >&2
}
# measure_start; run; measure_end ...: the script's measure_end sets
# $foreign from $b0 and $t0.
measure_start() { b0=$(busy); t0=$(date +%s.%N); }
