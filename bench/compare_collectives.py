#!/usr/bin/env python3
"""Weft's allreduce side by side with the peers, in one run (MEASURING.md).

For each repetition and each world size, runs in turn (A B C A B C ...):
  weft      build/bin/weft run -n N build/bin/weft-bench allreduce --json
  ompi-tcp  the Open MPI program of ../shared/anchors (mpirun --mca btl tcp,self)
  ompi-shm  the same with --mca btl vader,self       (only with --shm)
  gloo      the Gloo ring program of ../shared/anchors
and reports the median of each figure over the repetitions, and the ratios.
The peers' programs are compiled exactly as ../shared/anchors/run_anchors.sh
does; they measure the way weft-bench does (barrier before each iteration,
time = max over ranks, median over iterations, CPU summed over ranks).

  bench/compare_collectives.py [--worlds 2 4] [--reps 3] [--max-bytes 64M]
      [--weft-env WEFT_SHM=0 ...] [--shm] [--algo ring] [--build DIR]
Prints markdown tables (for BENCHMARKS.md) on stdout.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ANCHORS = os.path.normpath(os.path.join(ROOT, "..", "shared", "anchors"))


def parse_bytes(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def compile_peers(tmp):
    subprocess.run(["g++", "-O2", "-std=c++17", os.path.join(ANCHORS, "gloo_allreduce.cpp"), "-o",
                    os.path.join(tmp, "gloo_allreduce"), "-lgloo", "-lpthread"], check=True)
    subprocess.run(["mpicc", "-O2", os.path.join(ANCHORS, "mpi_allreduce.c"), "-o",
                    os.path.join(tmp, "mpi_allreduce")], check=True)


def peer_rows(text):
    """Lines 'bytes median_us algbw busbw cpu_us' -> {bytes: row}."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit():
            b = int(parts[0])
            rows[b] = {"time_us": float(parts[1]), "busbw": float(parts[3]), "cpu_us": float(parts[4])}
    return rows


def run_weft(build, n, max_bytes, env_extra, algo):
    env = dict(os.environ)
    env.update(env_extra)
    cmd = [os.path.join(build, "bin", "weft"), "run", "-n", str(n), "--no-prefix",
           os.path.join(build, "bin", "weft-bench"), "allreduce", "--json", "--in-place", "--max-bytes",
           str(max_bytes)]
    if algo:
        cmd += ["--algo", algo]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env).stdout
    rows, transport = {}, ""
    for line in out.splitlines():
        if line.startswith("{"):
            j = json.loads(line)
            if j["errors"]:
                sys.exit(f"weft-bench reported {j['errors']} wrong elements at {j['bytes']} bytes")
            rows[j["bytes"]] = {"time_us": j["time_us"], "busbw": j["busbw_gbps"], "cpu_us": j["cpu_us_per_iter"],
                                "algo": j["algo"]}
            transport = j.get("transport", "")
    return rows, transport


def run_ompi(tmp, n, max_bytes, btl):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(n), "--mca", "btl", f"{btl},self",
           "--mca", "btl_tcp_if_include", "lo", "--mca", "pml", "ob1", os.path.join(tmp, "mpi_allreduce"),
           str(max_bytes)]
    return peer_rows(subprocess.run(cmd, capture_output=True, text=True, timeout=1200).stdout)


def run_gloo(tmp, n, max_bytes):
    store = tempfile.mkdtemp(dir=tmp)
    exe = os.path.join(tmp, "gloo_allreduce")
    procs = [subprocess.Popen([exe, str(r), str(n), store, "ring", str(max_bytes)], stdout=subprocess.DEVNULL)
             for r in range(1, n)]
    out = subprocess.run([exe, "0", str(n), store, "ring", str(max_bytes)], capture_output=True, text=True,
                         timeout=1200).stdout
    for p in procs:
        p.wait()
    return peer_rows(out)


def median_rows(runs):
    """[{bytes: row}] -> {bytes: row of medians}."""
    out = {}
    for b in sorted(set().union(*[r.keys() for r in runs])):
        vals = [r[b] for r in runs if b in r]
        row = {k: statistics.median(v[k] for v in vals) for k in ("time_us", "busbw", "cpu_us")}
        if "algo" in vals[0]:
            row["algo"] = "/".join(sorted({v["algo"] for v in vals}))
        out[b] = row
    return out


def human(b):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b // size} {unit}"
    return f"{b} B"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-bytes", default="64M")
    ap.add_argument("--weft-env", nargs="*", default=[], help="K=V for the weft runs, e.g. WEFT_SHM=0")
    ap.add_argument("--algo", default="", help="force weft's algorithm")
    ap.add_argument("--shm", action="store_true", help="compare with Open MPI's shared-memory BTL too")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="the build directory")
    args = ap.parse_args()
    max_bytes = parse_bytes(args.max_bytes)
    env_extra = dict(kv.split("=", 1) for kv in args.weft_env)
    peers = ["ompi-tcp"] + (["ompi-shm"] if args.shm else []) + ([] if args.no_gloo else ["gloo"])
    with tempfile.TemporaryDirectory() as tmp:
        compile_peers(tmp)
        results = {(impl, n): [] for n in args.worlds for impl in ["weft"] + peers}
        transport = ""
        for rep in range(args.reps):
            for n in args.worlds:
                print(f"# repetition {rep + 1}/{args.reps}, {n} ranks", file=sys.stderr, flush=True)
                rows, transport = run_weft(args.build, n, max_bytes, env_extra, args.algo)
                results[("weft", n)].append(rows)
                for impl in peers:
                    if impl == "ompi-tcp":
                        results[(impl, n)].append(run_ompi(tmp, n, max_bytes, "tcp"))
                    elif impl == "ompi-shm":
                        results[(impl, n)].append(run_ompi(tmp, n, max_bytes, "vader"))
                    else:
                        results[(impl, n)].append(run_gloo(tmp, n, max_bytes))
    load = open("/proc/loadavg").read().split()[:3]
    print(f"Medians of {args.reps} alternating repetitions; weft transport: {transport}; "
          f"load average at the end: {' '.join(load)}.\n")
    for n in args.worlds:
        med = {impl: median_rows(results[(impl, n)]) for impl in ["weft"] + peers}
        print(f"### {n} ranks\n")
        head = "| bytes | weft algo | weft busbw | " + " | ".join(f"{p} busbw" for p in peers) + " | " + \
            " | ".join(f"weft / {p}" for p in peers) + " | weft CPU us | " + " | ".join(f"{p} CPU us" for p in peers) + " |"
        print(head)
        print("|" + " ---: |" * (head.count("|") - 1))
        for b in sorted(med["weft"]):
            w = med["weft"][b]
            cells = [human(b), w["algo"], f"{w['busbw']:.3f}"]
            cells += [f"{med[p][b]['busbw']:.3f}" if b in med[p] else "-" for p in peers]
            cells += [f"{w['busbw'] / med[p][b]['busbw']:.2f}x" if b in med[p] and med[p][b]["busbw"] > 0 else "-"
                      for p in peers]
            cells += [f"{w['cpu_us']:.0f}"] + [f"{med[p][b]['cpu_us']:.0f}" if b in med[p] else "-" for p in peers]
            print("| " + " | ".join(cells) + " |")
        w4 = med["weft"].get(4096)
        if w4:
            lat = ", ".join(f"{p} {med[p][4096]['time_us']:.1f} us" for p in peers if 4096 in med[p])
            print(f"\n4 KiB median latency: weft {w4['time_us']:.1f} us; {lat}.\n")


if __name__ == "__main__":
    main()
