#!/usr/bin/env bash
# Gradient compression (issue 13): Weft's codecs against uncompressed BSP,
# local SGD and PyTorch DDP (plain and with its fp16 hook) on 4 emulated
# hosts (network namespaces, scripts/cluster.sh) whose links are shaped to
# 10 Mbit/s, 100 Mbit/s, 1 Gbit/s or left unshaped. Needs root.
#
# Settings (--settings): none (uncompressed BSP), fp16, bf16, int8, topk:0.01,
# sign, powersgd:4, auto (weft fashion_mnist --compress X), local-sgd (--sync
# local-sgd, H = 8, --compress none), ddp and ddp-fp16 (the anchor
# ../shared/anchors/torch_ddp_fmnist.py, --hook none | fp16). Every run: the
# anchor's CNN, batch 64 per worker (global 256), SGD lr 0.05 momentum 0.9,
# constant rate, 1 intra-op thread per worker, seed 0, weft --balance none
# (equal shares, as DDP; --balance changes it). One worker per host.
#
# This machine has 2 cores: training every setting to 88% on every link would
# take hours (DDP needs ~2 s per step at 10 Mbit/s). The method instead:
#  (1) accuracy runs: every setting once, unshaped links, E epochs (--epochs,
#      default 3), the full 10k test set after each epoch; steps to 88% at
#      epoch granularity (the job evaluates once per epoch).
#  (2) timing runs, per link: every setting for a short run (--max-steps N, a
#      256-sample test set), the settings alternating A B C A B C over
#      --rounds rounds (default 2); odd rounds run N steps (--steps, default
#      24; --slow-steps, default 24, at 10 Mbit/s), even rounds N + D
#      (--extra-steps, default N/2 rounded up to a multiple of local SGD's
#      H = 8), so that the bytes of start-up cancel out:
#        step time  Weft: global batch / samples_per_s (its steps after the
#                   first 20); DDP: the same window of its step end times
#                   (bench/compression_ddp.py records them);
#        start-up   time from launch to the end of the last step, less N x the
#                   step time (process start, data loading, rendezvous, the
#                   parameter broadcast, auto's measurements of the codecs);
#        bytes/step tx_bytes of each host's eth0 (the same counter for Weft and
#                   DDP, all traffic with headers), per host: the difference
#                   between the N + D and the N runs divided by D (with one
#                   round: the whole run / N, start-up traffic included);
#      medians over rounds.
#  (3) time to 88% per (setting, link) = start-up + steps to 88% (from 1) x
#      step time (from 2): computed, not measured (evaluation time excluded).
#      For auto, the steps are those of the codec auto chose on that link
#      (its "compress" field) when that codec had an accuracy run (auto's own
#      accuracy run is left out when none, fp16, int8 and powersgd:4, its
#      candidates, all have one; --acc-auto runs it). Then
#      (unless --no-e2e) the Weft setting with the shortest computed time at
#      10 Mbit/s is run end to end there to 88%, as a cross-check.
# Output: OUT/report.md (tables, method, CPU model), OUT/results.jsonl (every
# run), OUT/logs/, PNGs in --png-dir (default bench/results; OUT with --quick).
#
#   bench/compression.sh [--rounds R] [--epochs E] [--links "10mbit 100mbit 1gbit unshaped"]
#       [--settings "none fp16 ..."] [--steps N] [--slow-steps N] [--extra-steps D]
#       [--quick] [--no-e2e] [--acc-auto] [--reuse-accuracy RESULTS.jsonl] [--rerun-accuracy "S ..."] [--balance MODE] [--quiet-wait S] [--build DIR]
#       [--anchors DIR] [--out DIR] [--png-dir DIR]
# --quick: 10 Mbit/s and unshaped, settings none topk:0.01 auto ddp-fp16, accuracy runs
#   of 12 steps, timing runs of 22/30 steps, 2 rounds, no end-to-end run (~5-8 min on a
#   quiet machine).
# --reuse-accuracy takes the accuracy runs from an earlier run's results.jsonl
# (for the settings it holds, except those --rerun-accuracy "S ..." names: a
# codec changed since) and makes the others, the timing and end-to-end runs.
# BENCH_NO_COMPRESS=1 leaves out --compress (a build without it: only none,
# local-sgd and the DDP settings are run). Re-make the report of a run:
#   /usr/bin/python3 bench/compression_report.py OUT [--png-dir DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
here="$root/bench"
rounds=2
epochs=3
links="10mbit 100mbit 1gbit unshaped"
settings="none fp16 bf16 int8 topk:0.01 sign powersgd:4 auto local-sgd ddp ddp-fp16"
steps=24
slow_steps=24
extra_steps=""
quick=0
e2e=1
balance=none
quiet_wait=5
build="$root/build"
anchors="$root/../shared/anchors"  # or ../../shared/anchors from a worktree under wt/
[ -d "$anchors" ] || [ ! -d "$root/../../shared/anchors" ] || anchors=$(cd "$root/../../shared/anchors" && pwd)
out=""
png_dir=""
acc_max_steps=0
acc_auto=0
reuse=""
rerun=""
# --quick sets its defaults first; the other arguments override them.
for a in "$@"; do
  if [ "$a" = --quick ]; then
    quick=1
    links="10mbit unshaped"
    settings="none topk:0.01 auto ddp-fp16"
    epochs=1; acc_max_steps=12; steps=22; slow_steps=22; extra_steps=8; e2e=0; quiet_wait=2
  fi
done
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --links) links=$2; shift 2 ;;
    --settings) settings=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --slow-steps) slow_steps=$2; shift 2 ;;
    --extra-steps) extra_steps=$2; shift 2 ;;
    --quick) shift ;;
    --no-e2e) e2e=0; shift ;;
    --acc-auto) acc_auto=1; shift ;;
    --reuse-accuracy) reuse=$2; shift 2 ;;
    --rerun-accuracy) rerun=" $2 "; shift 2 ;;
    --balance) balance=$2; shift 2 ;;
    --quiet-wait) quiet_wait=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --anchors) anchors=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --png-dir) png_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compression.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
[ "$quick" = 1 ] && out=${out:-$build/compression-quick}
out=${out:-$build/compression}
png_dir=${png_dir:-$([ "$quick" = 1 ] && echo "$out" || echo "$root/bench/results")}
for v in rounds epochs steps slow_steps; do
  case "${!v}" in '' | *[!0-9]* | 0) echo "compression.sh: --${v//_/-} must be a positive number" >&2; exit 2 ;; esac
done
[ "$steps" -gt 20 ] && [ "$slow_steps" -gt 20 ] ||
  { echo "compression.sh: --steps and --slow-steps must be above 20 (the first 20 are warm-up)" >&2; exit 2; }
[ -z "$extra_steps" ] || case "$extra_steps" in *[!0-9]* | 0) echo "compression.sh: --extra-steps must be a positive number" >&2; exit 2 ;; esac
weft="$build/bin/weft"
job="$build/bin/fashion_mnist"
py=/usr/bin/python3
for f in "$weft" "$job" "$anchors/torch_ddp_fmnist.py" "$py"; do
  [ -e "$f" ] || { echo "compression.sh: $f is missing (build: cmake -DWEFT_WITH_TORCH=ON, targets weft_cli fashion_mnist)" >&2; exit 1; }
done
"$py" -c 'import torch, matplotlib' 2>/dev/null ||
  { echo "compression.sh: /usr/bin/python3 needs torch and matplotlib (apt-get install python3-torch python3-matplotlib)" >&2; exit 1; }
msg=$("$root/scripts/cluster.sh" check) || { echo "compression.sh: $msg" >&2; exit 1; }

# Codecs need the job's --compress; without it only none, local SGD and DDP run.
has_compress=1
# (The help is read whole first: grep -q stopping early would kill the job
# with SIGPIPE, which pipefail reports as a missing flag.)
job_help=$("$job" --help 2>&1 || true)
if [ "${BENCH_NO_COMPRESS:-0}" = 1 ] || ! grep -q -- '--compress' <<<"$job_help"; then
  has_compress=0
  kept=""
  for s in $settings; do
    case "$s" in none | local-sgd | ddp | ddp-fp16) kept="$kept $s" ;;
      *) echo "compression.sh: $job has no --compress: leaving out $s" >&2 ;; esac
  done
  settings=${kept# }
fi
[ -n "$settings" ] || { echo "compression.sh: no settings to run" >&2; exit 2; }

mkdir -p "$out/logs" "$png_dir"
results="$out/results.jsonl"
: >"$results"
prefix="cmp$$"
hosts=4
cluster_rate=""
WEFT_JOB_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export WEFT_JOB_TOKEN
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$root/scripts/cluster.sh" down "$prefix" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cores=$(nproc)
. "$here/quiet.sh"  # busy, wait_quiet, measure_start ($b0, $t0)
# foreign RUSAGE_FILES...: the share of the machine's CPU time other processes
# took since measure_start.
foreign() {
  local b1 t1 ours
  b1=$(busy); t1=$(date +%s.%N)
  ours=$(cat "$@" 2>/dev/null | awk '{ s += $1 + $2 } END { print s + 0 }')
  "$py" -c "w = $t1 - $t0; f = ($b1 - $b0) / $hz - $ours; print('%.3f' % max(0.0, f / (w * $cores)))"
}

# link LINK: (re)builds the cluster with that link rate ("unshaped": none).
link() {
  local rate=$1
  [ "$rate" = unshaped ] && rate=0
  [ "$rate" = "$cluster_rate" ] && return 0
  echo "== cluster: $hosts hosts, links $1" >&2
  WEFT_CLUSTER_OWNER=$$ "$root/scripts/cluster.sh" up "$prefix" "$hosts" "$rate"
  cluster_rate=$rate
}
tx() { ip netns exec "$prefix-h$1" cat /sys/class/net/eth0/statistics/tx_bytes; }
tx_all() { local i s=""; for i in $(seq 1 $hosts); do s="$s${s:+,}$(tx "$i")"; done; echo "$s"; }

# stamp: node 0's output, each JSON line of an epoch prefixed by the time it
# arrived and every host's tx_bytes then ("- -" for the other lines).
stamp() {
  local l
  while IFS= read -r l; do
    if [[ $l == *'"test_accuracy"'* ]]; then
      echo "$(date +%s.%N) $(tx_all) $l"
    else
      echo "- - $l"
    fi
  done
}

port=29700
# weft_args SETTING: the job's arguments of a Weft setting.
weft_args() {
  case "$1" in
    local-sgd) echo "--sync local-sgd --local-steps 8 $([ $has_compress = 1 ] && echo --compress none)" ;;
    none) [ $has_compress = 1 ] && echo "--compress none" || true ;;
    *) echo "--compress $1" ;;
  esac
}

# launch TAG SETTING JOB_ARGS...: one run of SETTING on the 4 hosts; waits
# for it. Leaves $log (node 0's stamped output), $t_start, $t_end,
# $tx_before, $tx_after and $foreign_share. Returns non-zero if a host failed.
launch() {
  local tag=$1 setting=$2 i code=0 p
  shift 2
  port=$((port + 1))
  log="$out/logs/$tag.txt"
  wait_quiet
  tx_before=$(tx_all)
  local hp=()
  measure_start
  t_start=$(date +%s.%N)
  for i in $(seq 1 $hosts); do
    local cmd
    if [[ $setting == ddp* ]]; then
      local hook=none
      [ "$setting" = ddp-fp16 ] && hook=fp16
      cmd=("$py" "$here/compression_ddp.py" "$anchors/torch_ddp_fmnist.py" --world $hosts
           --rank $((i - 1)) --addr 10.77.0.1 --ifname eth0 --port "$port" --batch 64
           --lr 0.05 --threads 1 --hook "$hook" "$@")
    else
      # shellcheck disable=SC2046
      cmd=("$weft" run --nnodes $hosts --node-rank $((i - 1)) --master "10.77.0.1:$port"
           --nproc-per-node 1 --timeout 600 "$job" --json --batch-size 64 --lr 0.05
           --lr-schedule constant --warmup-epochs 0 --momentum 0.9 --threads 1
           --balance "$balance" --seed 0 $(weft_args "$setting") "$@")
    fi
    if [ "$i" = 1 ]; then
      (ip netns exec "$prefix-h$i" /usr/bin/time -f "%U %S" -o "$out/logs/ru$i" "${cmd[@]}" 2>&1 |
        stamp >"$log"; exit "${PIPESTATUS[0]}") &
    else
      ip netns exec "$prefix-h$i" /usr/bin/time -f "%U %S" -o "$out/logs/ru$i" "${cmd[@]}" \
        >"$out/logs/$tag.h$i.txt" 2>&1 &
    fi
    hp+=($!)
    pids+=($!)
  done
  for p in "${hp[@]}"; do wait "$p" || code=$?; done
  t_end=$(date +%s.%N)
  pids=()
  foreign_share=$(foreign "$out"/logs/ru?)
  tx_after=$(tx_all)
  if [ $code != 0 ]; then
    echo "compression.sh: $tag failed (exit $code); node 0's output:" >&2
    tail -n 20 "$log" >&2
    for i in $(seq 2 $hosts); do tail -n 5 "$out/logs/$tag.h$i.txt" >&2 || true; done
  fi
  return $code
}

# record PHASE LINK ROUND SETTING STEPS: appends the last run's figures to results.jsonl.
record() {
  "$py" - "$@" "$log" "$t_start" "$t_end" "$tx_before" "$tx_after" "$foreign_share" \
    "$out/logs" >>"$results" <<'EOF' || echo "compression.sh: could not read $log (the run is left out)" >&2
import glob, json, os, sys
phase, link, rnd, setting, steps, log, t0, t1, txb, txa, foreign, logs = sys.argv[1:]
t0, t1 = float(t0), float(t1)
rec = {"phase": phase, "link": link, "round": int(rnd), "setting": setting, "max_steps": int(steps),
       "t_start": t0, "wall_s": t1 - t0, "foreign": float(foreign),
       "tx_start": [int(x) for x in txb.split(",")], "tx_end": [int(x) for x in txa.split(",")]}
epochs, ddp = [], {}
for line in open(log, errors="replace"):
    ts, txs, rest = line.rstrip("\n").split(" ", 2)
    if "DDPSTEPS " in rest:
        d = json.loads(rest[rest.index("{"):])
        ddp[d["rank"]] = d
    elif ts != "-" and "{" in rest:  # a Weft epoch
        row = json.loads(rest[rest.index("{"):])
        row["t_arrived"] = float(ts)
        row["tx_arrived"] = [int(x) for x in txs.split(",")]
        epochs.append(row)
    elif rest.startswith("epoch ") and "test_acc" in rest:  # a DDP epoch (rank 0)
        f = rest.split()
        row = {"epoch": int(f[1]) + 1, "seconds": float(f[3].rstrip("s")),
               "steps": int(f[f.index("steps") + 1]), "test_accuracy": float(f[f.index("test_acc") + 1])}
        if ts != "-":
            row["t_arrived"] = float(ts)
        epochs.append(row)
if setting.startswith("ddp"):
    # The other ranks' step records are in their own logs.
    for path in glob.glob(os.path.join(logs, os.path.basename(log)[:-4] + ".h*.txt")):
        for line in open(path, errors="replace"):
            if line.startswith("DDPSTEPS "):
                d = json.loads(line[9:])
                ddp[d["rank"]] = d
    rec["ddp_steps"] = {str(k): v for k, v in sorted(ddp.items())}
rec["epochs"] = epochs
print(json.dumps(rec))
EOF
}

# ddp reports each epoch from rank 0 on stdout: its lines go through stamp too
# (not a JSON line: stamped "- -"), which record() reads.

start_all=$(date +%s)
took() {  # the last run's wall time, the CPU share others took, the time so far
  echo "   $(awk "BEGIN { printf \"%.0f\", $t_end - $t_start }") s, foreign CPU $foreign_share, $(($(date +%s) - start_all)) s in all" >&2
}
steps_of() { case "$1" in 10mbit | 1mbit | *kbit) echo "$slow_steps" ;; *) echo "$steps" ;; esac; }
echo "# compression benchmark: settings [$settings], links [$links], $rounds round(s), $epochs epoch(s) of accuracy runs" >&2

# (1) Accuracy runs, unshaped links. auto's choice is one of none, fp16, int8 and
# powersgd:4 (weft/compress.h): when each of them has an accuracy run, auto's
# time to 88% takes the steps of the one it chose, and its own run is left out
# (--acc-auto runs it).
acc_settings=$settings
if [ "$acc_auto" = 0 ] && [[ " $settings " == *" auto "* ]]; then
  all=1
  for c in none fp16 int8 powersgd:4; do [[ " $settings " == *" $c "* ]] || all=0; done
  [ $all = 1 ] && acc_settings=$(echo " $settings " | sed 's/ auto / /; s/^ //; s/ $//')
fi
if [ -n "$reuse" ]; then
  # The accuracy runs of an earlier run (its results.jsonl) for every setting it holds,
  # except those of --rerun-accuracy; the others are run.
  [ -r "$reuse" ] || { echo "compression.sh: --reuse-accuracy $reuse: cannot read it" >&2; exit 2; }
  grep -q '^{"phase": "accuracy"' "$reuse" ||
    { echo "compression.sh: --reuse-accuracy $reuse: no accuracy runs in it" >&2; exit 2; }
  todo=""
  for s in $acc_settings; do
    if [[ " $rerun " != *" $s "* ]] &&
      grep -F "{\"phase\": \"accuracy\", \"link\": \"unshaped\", \"round\": 1, \"setting\": \"$s\"," "$reuse" >>"$results"; then
      echo "== accuracy: $s taken from $reuse" >&2
    else
      todo="$todo $s"
    fi
  done
  acc_settings=${todo# }
fi
[ -n "$acc_settings" ] && link unshaped
for s in $acc_settings; do
  echo "== accuracy: $s, $epochs epoch(s)" >&2
  tag="acc-${s//[:.]/_}"
  a=(--epochs "$epochs")
  [ "$acc_max_steps" -gt 0 ] && a+=(--max-steps "$acc_max_steps")
  if launch "$tag" "$s" "${a[@]}"; then
    record accuracy unshaped 1 "$s" "$acc_max_steps"
  fi
  took
done

# (2) Timing runs per link, settings alternating.
for l in $links; do
  link "$l"
  for r in $(seq 1 "$rounds"); do
    n=$(steps_of "$l")
    # D: a multiple of local SGD's H = 8, so that both runs' extra steps hold whole periods.
    [ $((r % 2)) = 0 ] && n=$((n + ${extra_steps:-$(((n / 2 + 7) / 8 * 8))}))
    for s in $settings; do
      echo "== timing: $l, round $r/$rounds, $s, $n steps" >&2
      tag="time-$l-$r-${s//[:.]/_}"
      a=(--epochs 1 --max-steps "$n")
      [[ $s == ddp* ]] || a+=(--test-samples 256)
      if launch "$tag" "$s" "${a[@]}"; then
        record timing "$l" "$r" "$s" "$n"
      fi
      took
    done
  done
done

# (3) End to end at 10 Mbit/s: the Weft setting with the shortest computed time to 88%.
if [ "$e2e" = 1 ] && [[ " $links " == *" 10mbit "* ]]; then
  pick=$("$py" "$here/compression_report.py" "$out" --pick-e2e 10mbit || true)
  if [ -n "$pick" ]; then
    read -r s e <<<"$pick"
    link 10mbit
    echo "== end to end: $s at 10mbit, $e epoch(s)" >&2
    if launch "e2e-10mbit-${s//[:.]/_}" "$s" --epochs "$e"; then
      record e2e 10mbit 1 "$s" 0
    fi
  else
    echo "compression.sh: no Weft setting reached 88% in the accuracy runs: no end-to-end run" >&2
  fi
fi

"$root/scripts/cluster.sh" down "$prefix"
cluster_rate=""
{
  echo "cpu $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "cores $cores"
  echo "kernel $(uname -r)"
  echo "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "date $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "elapsed_s $(($(date +%s) - start_all))"
  echo "rounds $rounds"
  echo "epochs $epochs"
  echo "balance $balance"
  echo "quick $quick"
  echo "has_compress $has_compress"
  [ -z "$reuse" ] || echo "accuracy_from $reuse"
  [ -z "$reuse" ] || echo "accuracy_made ${acc_settings:--}"
} >"$out/meta.txt"
"$py" "$here/compression_report.py" "$out" --png-dir "$png_dir"
echo "compression.sh: report in $out/report.md, plots in $png_dir" >&2
