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

With --hosts H (2 or more) every run is one elastic job over H emulated
hosts (scripts/cluster.sh: network namespaces on a bridge, links shaped to
--link-mbit): one `weft run --nnodes 1:H` per host, --workers / H workers
each, node 0 (host 1) serving the store. The faults are then kill, kill2,
recovery and stop as above (members n<node>.s<slot>), and:

  host        every process on the last host SIGKILLed at a random time in
              the first half of training (the host dies)
  linkdown    the last host's link down for 3 s at a random time, then up
  quiet       no fault, the links full of gradient traffic (--link-ballast
              floats per step): nobody may be declared dead
  storehost   with --etcd: the store is an etcd cluster with a member on
              each of hosts 1-3 (no launcher serves one); host 1, which runs
              node 0 and an etcd member, is killed at a random time (the
              host that serves the store dies; the job goes on on the
              others: needs --hosts 3 or more)

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
HOST_FAULTS = ["kill", "kill2", "recovery", "stop", "host", "linkdown", "quiet", "storehost"]
NO_FAULT = ("slow", "quiet")  # any membership change is a false detection
# Without --faults (quiet, which is slow, is asked for by name).
DEFAULT_HOST_FAULTS = ["kill", "kill2", "recovery", "stop", "host", "linkdown"]
CLUSTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "cluster.sh")
TOKEN = "chaos-bench-job-token-0123456789"
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
    if args.hosts >= 2:
        return one_cluster_run(args, seed, fault)
    rng = random.Random(seed)
    w = args.workers
    steps_per_epoch = -(-args.samples // args.global_batch)
    total_steps = steps_per_epoch * args.epochs
    cmd = [f"{args.bin}/weft", "run", "-n", str(w), "--elastic", f"{args.min}:{w}",
           "--max-restarts", str(args.max_restarts), "--"] + job_args(args)
    env = dict(os.environ)
    at_step = rng.randrange(5, max(6, total_steps // 2))
    victims = [f"n0.s{v}.r0" for v in rng.sample(range(w), 2)]
    cmd, detail = worker_fault(cmd, fault, victims, at_step)
    if fault == "slow":
        detail = "slot 0 in a 10% CPU cgroup"
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    lines = []
    second_killed = threading.Event()
    t = threading.Thread(target=read_output, args=(p, lines, fault, victims, second_killed),
                         daemon=True)
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
    return verdict(args, seed, fault, detail, p.returncode, "".join(lines), seconds)


def job_args(args, extra=()):
    return [f"{args.bin}/elastic_worker", "--epochs", str(args.epochs), "--samples",
            str(args.samples), "--global-batch", str(args.global_batch), "--step-ms",
            str(args.step_ms), "--busy-ms", str(args.busy_ms)] + list(extra)


def worker_fault(cmd, fault, victims, at_step):
    """The worker's own fault flags (kill, kill2, recovery, stop) and the detail."""
    if fault == "kill":
        return cmd + ["--die-member", victims[0], "--die-at-step", str(at_step)], \
            f"{victims[0]} at step {at_step}"
    if fault == "kill2":
        return cmd + ["--die-member", victims[0], "--die-member", victims[1], "--die-at-step",
                      str(at_step)], f"{victims[0]} + {victims[1]} at step {at_step}"
    if fault == "recovery":
        return cmd + ["--die-member", victims[0], "--die-at-step", str(at_step)], \
            f"{victims[0]} at step {at_step}, then {victims[1]} in recovery"
    if fault == "stop":
        return cmd + ["--stop-member", victims[0], "--stop-at-step", str(at_step)], \
            f"{victims[0]} stopped at step {at_step}"
    return cmd, ""


def read_output(p, lines, fault, victims, second_killed):
    for line in p.stdout:
        lines.append(line)
        if fault == "recovery" and not second_killed.is_set() and "aborted" in line:
            # The survivors are recovering: kill a second worker now.
            for pid in worker_pids(p.pid):
                if member_of(pid) == victims[1]:
                    os.kill(pid, signal.SIGKILL)
                    second_killed.set()


def verdict(args, seed, fault, detail, code, out, seconds):
    once = out.count('"exactly_once": true')
    bad = out.count('"exactly_once": false')
    changes = [(int(g), float(s), c) for g, s, c in GEN_RE.findall(out)]
    # One line per rank: keep the slowest rank's time per generation.
    per_gen = {}
    for g, s, c in changes:
        per_gen[g] = max(per_gen.get(g, 0.0), s)
    failures = [per_gen[g] for g, s, c in changes if c == "failure"]
    return {
        "seed": seed, "fault": fault, "detail": detail, "exit": code,
        "epochs_exactly_once": once, "epochs_wrong": bad, "epochs": args.epochs,
        "generations": len(per_gen) + 1, "recovery_s": sorted(set(failures)),
        "false_detections": len(per_gen) if fault in NO_FAULT else 0,
        "seconds": round(seconds, 2), "ok": code == 0 and once == args.epochs and bad == 0,
        "tail": out[-2000:] if code != 0 else "",
    }


def one_cluster_run(args, seed, fault):
    """One elastic job over args.hosts emulated hosts (see the module doc)."""
    rng = random.Random(seed)
    h = args.hosts
    per = args.workers // h
    steps_per_epoch = -(-args.samples // args.global_batch)
    total_steps = steps_per_epoch * args.epochs
    at_step = rng.randrange(5, max(6, total_steps // 2))
    members = [f"n{n}.s{s}.r0" for n in range(h) for s in range(per)]
    victims = rng.sample(members, 2)
    extra = ["--ballast-floats", str(args.link_ballast)] if fault == "quiet" else []
    job, detail = worker_fault(job_args(args, extra), fault, victims, at_step)
    # A host fault comes at a random time in the first half of training.
    at_s = rng.uniform(0.5, max(1.0, total_steps * args.step_ms / 1000 / 2))
    if fault == "host":
        detail = f"host {h} (node {h - 1}) killed {at_s:.1f} s into training"
    elif fault == "linkdown":
        detail = f"host {h}'s link down for 3 s, {at_s:.1f} s into training"
    elif fault == "quiet":
        detail = f"{args.link_ballast * 4 / 2**20:g} MiB of gradient per step"
    if fault == "storehost":
        detail = f"host 1 (node 0 and an etcd member) killed {at_s:.1f} s into training"
    port = 29500 + seed % 400
    env = dict(os.environ, WEFT_JOB_TOKEN=TOKEN)
    etcd = start_etcd(args, seed) if args.etcd else None
    where = ["--store", etcd["url"]] if etcd else ["--master", f"10.77.0.1:{port}"]
    procs = []
    t0 = time.monotonic()
    for n in range(h):
        cmd = [CLUSTER, "exec", args.prefix, str(n + 1), f"{args.bin}/weft", "run", "--nnodes",
               f"1:{h}", "--node-rank", str(n)] + where + [
               "--nproc-per-node", str(per), "--max-restarts", str(args.max_restarts), "--"] + job
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env, start_new_session=True))
    outs = [[] for _ in procs]
    second_killed = threading.Event()
    readers = [threading.Thread(target=read_output, args=(p, outs[i], fault, victims,
                                                          second_killed), daemon=True)
               for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    if fault in ("host", "linkdown", "storehost"):
        # Training has started when node 0's rank 0 reports the membership.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any('"event": "membership"' in x
                                                      for x in outs[0]):
            time.sleep(0.05)
        time.sleep(at_s)
        if fault == "host":
            subprocess.run([CLUSTER, "kill", args.prefix, str(h)], capture_output=True)
        elif fault == "storehost":
            subprocess.run([CLUSTER, "kill", args.prefix, "1"], capture_output=True)
        else:
            subprocess.run([CLUSTER, "link", args.prefix, str(h), "down"], capture_output=True)
            time.sleep(3)
            subprocess.run([CLUSTER, "link", args.prefix, str(h), "up"], capture_output=True)
    codes = []
    for p in procs:
        try:
            p.wait(timeout=max(1.0, args.timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        codes.append(p.returncode)
    for r in readers:
        r.join(timeout=5)
    seconds = time.monotonic() - t0
    if etcd:
        stop_etcd(etcd)
    # Rank 0 prints the ledger, on whichever node it is (after node 0's
    # workers fail, one of another node's); a killed host's launcher is
    # expected to have died with it.
    killed = {"host": h - 1, "storehost": 0}.get(fault, -1)
    code = next((c for i, c in enumerate(codes) if c != 0 and i != killed), 0)
    r = verdict(args, seed, fault, detail, code, "".join("".join(o) for o in outs), seconds)
    r["exits"] = codes
    if code != 0:
        r["tail"] = "\n".join("".join(o)[-1500:] for o in outs)
    return r


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
    ap.add_argument("--link-mbit", type=float, default=100,
                    help="the emulated hosts' links in Mbit/s (--hosts)")
    ap.add_argument("--link-ballast", type=int, default=1 << 18,
                    help="floats of extra gradient per step in the quiet fault (--hosts)")
    ap.add_argument("--hosts", type=int, default=0,
                    help="run every job over this many emulated hosts (0: one host)")
    ap.add_argument("--prefix", default=f"wch{os.getpid() % 100000}",
                    help="the emulated cluster's name prefix (--hosts)")
    ap.add_argument("--etcd", action="store_true",
                    help="the store is a 3-member etcd cluster on hosts 1-3 (--hosts 3+)")
    ap.add_argument("--etcd-bin", default="/usr/bin/etcd")
    ap.add_argument("--faults", default="")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    known = HOST_FAULTS if args.hosts >= 2 else FAULTS
    faults = args.faults.split(",") if args.faults else (
        DEFAULT_HOST_FAULTS if args.hosts >= 2 else FAULTS)
    for f in faults:
        if f not in known:
            ap.error(f"--faults: unknown fault '{f}' (known: {', '.join(known)})")
    if args.hosts == 1 or (args.hosts >= 2 and args.workers % args.hosts != 0):
        ap.error("--hosts: 2 or more, dividing --workers")
    if args.etcd and args.hosts < 3:
        ap.error("--etcd needs --hosts 3 or more (an etcd member on each of hosts 1-3)")
    if "storehost" in faults and not args.etcd:
        ap.error("the storehost fault needs --etcd (the embedded store dies with its host)")
    if args.hosts >= 2:
        rate = f"{args.link_mbit:g}mbit"
        r = subprocess.run([CLUSTER, "up", args.prefix, str(args.hosts), rate],
                           capture_output=True, text=True,
                           env=dict(os.environ, WEFT_CLUSTER_OWNER=str(os.getpid())))
        if r.returncode != 0:
            sys.exit(f"chaos: cluster.sh up failed: {r.stdout}{r.stderr}")
    try:
        return run_all(args, faults)
    finally:
        if args.hosts >= 2:
            subprocess.run([CLUSTER, "down", args.prefix], capture_output=True)


def start_etcd(args, seed):
    """A 3-member etcd cluster, a member on each of hosts 1-3 (fresh data)."""
    base = f"/tmp/weft-chaos-etcd-{os.getpid()}-{seed}"
    subprocess.run(["rm", "-rf", base])
    initial = ",".join(f"e{i}=http://10.77.0.{i}:2380" for i in (1, 2, 3))
    procs = []
    for i in (1, 2, 3):
        os.makedirs(f"{base}/e{i}")
        ip = f"10.77.0.{i}"
        log = open(f"{base}/e{i}.log", "w")
        procs.append(subprocess.Popen(
            [CLUSTER, "exec", args.prefix, str(i), args.etcd_bin, f"--name=e{i}",
             f"--data-dir={base}/e{i}", f"--listen-client-urls=http://{ip}:2379",
             f"--advertise-client-urls=http://{ip}:2379", f"--listen-peer-urls=http://{ip}:2380",
             f"--initial-advertise-peer-urls=http://{ip}:2380", f"--initial-cluster={initial}",
             "--initial-cluster-state=new", f"--initial-cluster-token=chaos-{seed}",
             "--heartbeat-interval=50", "--election-timeout=500", "--log-level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    url = f"etcd://10.77.0.1:2379,10.77.0.2:2379,10.77.0.3:2379/chaos-{seed}"
    # Up when every member answers.
    deadline = time.monotonic() + 30
    for i in (1, 2, 3):
        while True:
            r = subprocess.run([CLUSTER, "exec", args.prefix, str(i), "etcdctl",
                                f"--endpoints=http://10.77.0.{i}:2379", "endpoint", "health"],
                               capture_output=True, text=True, env=dict(os.environ,
                                                                       ETCDCTL_API="3"))
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                sys.exit(f"chaos: etcd member {i} did not come up: {r.stdout}{r.stderr}")
            time.sleep(0.2)
    return {"procs": procs, "dir": base, "url": url}


def stop_etcd(etcd):
    for p in etcd["procs"]:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    subprocess.run(["rm", "-rf", etcd["dir"]])


def run_all(args, faults):
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
