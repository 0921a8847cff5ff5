"""Time lost per failure: Weft's elastic recovery against torchrun --max_restarts.

Issue 11's comparison. The same work on both sides: W workers on this
machine train the Fashion-MNIST CNN of ../shared/anchors/torch_ddp_fmnist.py
(batch 64 per worker, SGD lr 0.05 momentum 0.9, one intra-op thread) for E
epochs of the first S training samples.
  weft      weft run -n W --elastic 2:W --max-restarts 3 -- fashion_mnist
            (its defaults under --elastic: an in-memory commit every step)
  torchrun  python3 -m torch.distributed.run --standalone --max_restarts 3
            bench/torchrun_ckpt.py (DDP, gloo; a checkpoint each epoch, loaded
            at start, as torchrun's documentation shows)
Each round runs, alternating, every framework once without a fault and once
with worker 1 SIGKILLed halfway through that framework's failure-free run
of the same round. Time lost per failure = wall time with the failure minus
wall time without it, per round; medians over the rounds. Prints Markdown.

    python3 bench/restart_compare.py --bin build/bin --anchors ../shared/anchors [--rounds 3]
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ACC_RE = re.compile(r'"test_accuracy": ([0-9.]+)')
GEN_RE = re.compile(r"generation (\d+) formed in ([0-9.]+) s \(failure")


def env_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            out = {}
            for kv in f.read().split(b"\0"):
                if b"=" in kv:
                    k, v = kv.split(b"=", 1)
                    out[k.decode(errors="replace")] = v.decode(errors="replace")
            return out
    except OSError:
        return {}


def victim(marker, framework):
    """The pid of worker 1 of the run tagged `marker` (first incarnation), or None."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        e = env_of(int(name))
        if e.get("RESTART_COMPARE_RUN") != marker:
            continue
        if framework == "weft" and e.get("WEFT_MEMBER") == "n0.s1.r0":
            return int(name)
        if (framework == "torchrun" and e.get("LOCAL_RANK") == "1"
                and e.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            return int(name)
    return None


def command(args, framework, ckdir):
    w = str(args.workers)
    if framework == "weft":
        return [f"{args.bin}/weft", "run", "-n", w, "--oversubscribe", "--elastic", f"2:{w}",
                "--max-restarts", "3", "--", f"{args.bin}/fashion_mnist", "--json", "--epochs",
                str(args.epochs), "--train-samples", str(args.train_samples), "--test-samples",
                str(args.test_samples), "--batch-size", "64", "--lr", "0.05", "--lr-schedule",
                "constant", "--warmup-epochs", "0", "--momentum", "0.9", "--threads", "1",
                "--balance", "none"]
    return [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", w,
            "--max_restarts", "3", "--redirects", "2", "--tee", "1",
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_ckpt.py"),
            "--anchors", args.anchors, "--checkpoint-dir", ckdir, "--epochs", str(args.epochs),
            "--train-samples", str(args.train_samples), "--test-samples", str(args.test_samples)]


def one_run(args, framework, kill_after):
    marker = uuid.uuid4().hex
    env = dict(os.environ, RESTART_COMPARE_RUN=marker, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as ckdir:
        t0 = time.monotonic()
        p = subprocess.Popen(command(args, framework, ckdir), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
        reader.start()
        killed_at = None
        if kill_after is not None:
            while p.poll() is None and time.monotonic() - t0 < kill_after:
                time.sleep(0.05)
            pid = victim(marker, framework)
            if pid is not None and p.poll() is None:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic() - t0
        try:
            p.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        seconds = time.monotonic() - t0
        reader.join(timeout=5)
    out = "".join(lines)
    acc = ACC_RE.findall(out)
    return {
        "framework": framework, "fault": kill_after is not None, "exit": p.returncode,
        "seconds": round(seconds, 2), "killed_at": None if killed_at is None else round(killed_at, 2),
        "accuracy": float(acc[-1]) if acc else None,
        "restarts": out.count('"event": "start"') - 1 if framework == "torchrun" else None,
        "recovery_s": sorted({float(s) for _, s in GEN_RE.findall(out)}),
        "tail": out[-3000:] if p.returncode != 0 or (kill_after is not None and killed_at is None)
        else "",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--anchors", default="../shared/anchors")
    ap.add_argument("--python", default="/usr/bin/python3")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=12000)
    ap.add_argument("--test-samples", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", default="", help="append every run's JSON to this file")
    args = ap.parse_args()
    t_all = time.monotonic()
    runs = []
    for r in range(1, args.rounds + 1):
        for fw in ("weft", "torchrun"):
            free = one_run(args, fw, None)
            hit = one_run(args, fw, free["seconds"] / 2)
            for x in (free, hit):
                x["round"] = r
                runs.append(x)
                print(f"round {r} {fw} fault={x['fault']} exit={x['exit']} {x['seconds']} s "
                      f"killed_at={x['killed_at']} acc={x['accuracy']}", file=sys.stderr, flush=True)
                if x["tail"]:
                    print(x["tail"], file=sys.stderr)
                if args.keep:
                    with open(args.keep, "a") as f:
                        f.write(json.dumps(x) + "\n")
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"{os.cpu_count()} x {cpu}; {args.workers} workers, {args.epochs} epochs of "
          f"{args.train_samples} samples, {args.rounds} round(s), alternating; worker 1 "
          f"SIGKILLed halfway through the framework's failure-free run of the round; "
          f"{time.monotonic() - t_all:.0f} s in all.\n")
    print("| framework | without a failure, s | with one, s | time lost per failure, s "
          "(per round) | killed at, s | exits | final accuracy without / with | recovery |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- | --- |")
    lost = {}
    for fw in ("weft", "torchrun"):
        free = [x for x in runs if x["framework"] == fw and not x["fault"]]
        hit = [x for x in runs if x["framework"] == fw and x["fault"]]
        per_round = [h["seconds"] - f["seconds"] for f, h in zip(free, hit)]
        lost[fw] = statistics.median(per_round)
        acc = lambda xs: "/".join("-" if x["accuracy"] is None else f"{x['accuracy']:.3f}" for x in xs)
        if fw == "weft":
            rec = "generation formed in " + ", ".join(
                f"{max(x['recovery_s']) if x['recovery_s'] else '-'}" for x in hit) + " s"
        else:
            rec = "restarts " + ", ".join(str(x["restarts"]) for x in hit)
        print(f"| {fw} | {statistics.median(x['seconds'] for x in free):.1f} | "
              f"{statistics.median(x['seconds'] for x in hit):.1f} | **{lost[fw]:.1f}** "
              f"({', '.join(f'{v:.1f}' for v in per_round)}) | "
              f"{', '.join(str(x['killed_at']) for x in hit)} | "
              f"{','.join(str(x['exit']) for x in free + hit)} | {acc(free)} / {acc(hit)} | {rec} |")
    if lost["weft"] > 0:
        print(f"\ntorchrun loses {lost['torchrun'] / lost['weft']:.1f}x the time Weft loses per "
              "failure (ratio of the medians).")
    else:
        print(f"\nWeft lost {lost['weft']:.1f} s (median): no more than the noise between runs; "
              f"torchrun lost {lost['torchrun']:.1f} s.")


if __name__ == "__main__":
    main()
