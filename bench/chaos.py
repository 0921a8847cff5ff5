#!/usr/bin/env python3
"""Seeded chaos runs of elastic training (bench/chaos.sh runs this).

Each run starts `weft run -n W --elastic MIN:W` with the elastic test job
(build/bin/elastic_worker, tests/train/elastic_worker.cc) and injects one
fault chosen from the seed:

  kill        SIGKILL of a random worker at a random step
  kill2       two workers SIGKILLed at the same step
  recovery    a worker SIGKILLed at a random step, and a second one as soon
              as the survivors start recovering (a failure during recovery)
  stop        SIGSTOP of a random worker (liveness must evict it)
  slow        one worker throttled to 10% of a CPU (cgroup quota) for the
              whole run: no fault, and nobody may be declared dead

It reports, per run: the seed, the fault, the exit code, whether the
ledger says every sample was trained exactly once in every epoch, the
membership changes with how long each took, and false detections (a change
in a run without a fault). Output: a Markdown table and one JSON line per
run (--json FILE).
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

FAULTS = ["kill", "kill2", "recovery", "stop", "slow"]
GEN_RE = re.compile(r"generation (\d+) formed in ([0-9.]+) s \((failure|join)")


def worker_pids(launcher_pid):
    """PIDs of the elastic_worker processes under the launcher."""
    out = subprocess.run(["pgrep", "-f", "elastic_worker"], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split() if os.path.isdir(f"/proc/{p}"))


def member_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for kv in f.read().split(b"\0"):
                if kv.startswith(b"WEFT_MEMBER="):
                    return kv.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def one_run(args, seed, fault):
    rng = random.Random(seed)
    w = args.workers
    steps_per_epoch = -(-args.samples // args.global_batch)
    total_steps = steps_per_epoch * args.epochs
    cmd = [f"{args.bin}/weft", "run", "-n", str(w), "--elastic", f"{args.min}:{w}",
           "--max-restarts", str(args.max_restarts), "--",
           f"{args.bin}/elastic_worker", "--epochs", str(args.epochs), "--samples",
           str(args.samples), "--global-batch", str(args.global_batch), "--step-ms",
           str(args.step_ms), "--busy-ms", str(args.busy_ms)]
    env = dict(os.environ)
    at_step = rng.randrange(5, max(6, total_steps // 2))
    victims = rng.sample(range(w), 2)
    detail = ""
    if fault == "kill":
        cmd += ["--die-member", f"n0.s{victims[0]}.r0", "--die-at-step", str(at_step)]
        detail = f"n0.s{victims[0]}.r0 at step {at_step}"
    elif fault == "kill2":
        cmd += ["--die-member", f"n0.s{victims[0]}.r0", "--die-member", f"n0.s{victims[1]}.r0",
                "--die-at-step", str(at_step)]
        detail = f"n0.s{victims[0]}.r0 + n0.s{victims[1]}.r0 at step {at_step}"
    elif fault == "recovery":
        cmd += ["--die-member", f"n0.s{victims[0]}.r0", "--die-at-step", str(at_step)]
        detail = f"n0.s{victims[0]}.r0 at step {at_step}, then n0.s{victims[1]}.r0 in recovery"
    elif fault == "stop":
        cmd += ["--stop-member", f"n0.s{victims[0]}.r0", "--stop-at-step", str(at_step)]
        detail = f"n0.s{victims[0]}.r0 stopped at step {at_step}"
    elif fault == "slow":
        detail = "slot 0 in a 10% CPU cgroup"
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    lines = []
    second_killed = threading.Event()

    def reader():
        for line in p.stdout:
            lines.append(line)
            if fault == "recovery" and not second_killed.is_set() and "aborted" in line:
                # The survivors are recovering: kill a second worker now.
                for pid in worker_pids(p.pid):
                    if member_of(pid) == f"n0.s{victims[1]}.r0":
                        os.kill(pid, signal.SIGKILL)
                        second_killed.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    cgroup = None
    if fault == "slow":
        cgroup = throttle_slot0(p.pid)
    try:
        p.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    t.join(timeout=5)
    seconds = time.monotonic() - t0
    if cgroup:
        try:
            os.rmdir(cgroup)
        except OSError:
            pass
    out = "".join(lines)
    once = out.count('"exactly_once": true')
    bad = out.count('"exactly_once": false')
    changes = [(int(g), float(s), c) for g, s, c in GEN_RE.findall(out)]
    # One line per rank: keep the slowest rank's time per generation.
    per_gen = {}
    for g, s, c in changes:
        per_gen[g] = max(per_gen.get(g, 0.0), s)
    failures = [per_gen[g] for g, s, c in changes if c == "failure"]
    return {
        "seed": seed, "fault": fault, "detail": detail, "exit": p.returncode,
        "epochs_exactly_once": once, "epochs_wrong": bad, "epochs": args.epochs,
        "generations": len(per_gen) + 1, "recovery_s": sorted(set(failures)),
        "false_detections": len(per_gen) if fault == "slow" else 0,
        "seconds": round(seconds, 2), "ok": p.returncode == 0 and once == args.epochs and bad == 0,
        "tail": out[-2000:] if p.returncode != 0 else "",
    }


def throttle_slot0(launcher_pid):
    """Moves worker n0.s0.r0 into a cgroup of 10% of a CPU (cgroup v1 or v2)."""
    base = "/sys/fs/cgroup/cpu" if os.path.isdir("/sys/fs/cgroup/cpu") else "/sys/fs/cgroup"
    path = f"{base}/weft-chaos-{os.getpid()}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for pid in worker_pids(launcher_pid):
            if member_of(pid) == "n0.s0.r0":
                try:
                    os.makedirs(path, exist_ok=True)
                    if base.endswith("/cpu"):
                        open(f"{path}/cpu.cfs_period_us", "w").write("100000")
                        open(f"{path}/cpu.cfs_quota_us", "w").write("10000")
                    else:
                        open(f"{path}/cpu.max", "w").write("10000 100000")
                    open(f"{path}/cgroup.procs", "w").write(str(pid))
                    return path
                except OSError as e:
                    print(f"chaos: cannot throttle ({e}); the slow run is not throttled",
                          file=sys.stderr)
                    return None
        time.sleep(0.02)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--min", type=int, default=2)
    ap.add_argument("--max-restarts", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--global-batch", type=int, default=48)
    ap.add_argument("--step-ms", type=float, default=10)
    ap.add_argument("--busy-ms", type=float, default=0,
                    help="CPU time each worker spins per step (the slow fault then holds "
                         "a busy worker at 10%% of a CPU, not a sleeping one)")
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    faults = args.faults.split(",")
    for f in faults:
        if f not in FAULTS:
            ap.error(f"--faults: unknown fault '{f}' (known: {', '.join(FAULTS)})")
    results = []
    print("| run | seed | fault | detail | exit | epochs exactly once | recovery (s) | "
          "false detections | time (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i in range(args.runs):
        seed = args.seed + i
        fault = faults[random.Random(seed * 7919).randrange(len(faults))] if len(faults) > 1 \
            else faults[0]
        r = one_run(args, seed, fault)
        results.append(r)
        rec = ", ".join(f"{x:.2f}" for x in r["recovery_s"]) or "-"
        print(f"| {i + 1} | {seed} | {fault} | {r['detail']} | {r['exit']} | "
              f"{r['epochs_exactly_once']}/{r['epochs']} | {rec} | {r['false_detections']} | "
              f"{r['seconds']} |", flush=True)
        if not r["ok"] and r["tail"]:
            print(r["tail"], file=sys.stderr)
    ok = sum(r["ok"] for r in results)
    print(f"\n{ok} of {len(results)} runs finished with every sample trained exactly once per "
          f"epoch")
    if args.json:
        with open(args.json, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
