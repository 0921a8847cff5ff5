"""The Markdown report of bench/balance.sh, from its results directory:
results.txt (lines KEY ROUND FOREIGN RATE RATE_ALL [EXTRA...]), meta.json and
keep-b-ROUND.log (the timestamped output of the changing-quota runs, written
by balance_drive.py).

  balance_report.py RESULTS_DIR
"""
import glob, json, os, re, statistics, sys

out = sys.argv[1]
results = os.path.join(out, "results.txt")
meta = json.load(open(os.path.join(out, "meta.json")))
rounds, steps, cores, cpu = int(meta["rounds"]), int(meta["steps"]), int(meta["cores"]), meta["cpu"]
legacy, total_s = meta["legacy"], int(meta["total_s"])
t1, t2, t3 = ("%g" % meta[k] for k in ("t1", "t2", "t3"))
acc_epochs = int(meta["acc_epochs"])
rows = {}
for line in open(results):
    f = line.split()
    rows.setdefault(f[0], []).append(f[1:])
def col(key, i, clean=False):
    return [float(r[i]) for r in rows.get(key, []) if not clean or float(r[1]) < 0.10]
def med(key, i=2, clean=False):
    v = col(key, i, clean)
    return statistics.median(v) if v else float("nan")
def fmt_runs(key):
    return ", ".join("%.0f (%.0f%%)" % (float(r[2]), 100 * float(r[1])) for r in rows.get(key, []))
def pct(x):
    return "-" if x != x else "%.1f%%" % (100 * x)

print("### bench/balance.sh: 4 workers, one slowed down")
print()
print(f"{cores} x {cpu}; {rounds} round(s), settings alternating; each weft run {steps} steps of "
      f"batch 64 per worker (global 256), 1 intra-op thread per worker; samples/s after the first 20 "
      f"steps (whole run in brackets); medians over the rounds; foreign = CPU share other processes "
      f"took during the run; {total_s} s in all." + {
          "1": " The kernel's sched_autogroup was switched off while it ran (it was on).",
          "0": " The kernel's sched_autogroup was off.",
      }.get(str(meta.get("autogroup", "")), ""))
if legacy:
    print()
    print("**--legacy: the build had no --balance flag, so every weft setting below is equal-share "
          "BSP; these figures test the script, not the balancer.**")

if "a_ideal" in rows:
    print()
    print("#### a) Worker 3 of 4 throttled to 25% of a core (cgroup CPU quota)")
    print()
    print("| setting | samples/s, median | whole run | / ideal | runs (foreign) | worker 3 throttled | shares at the end (last round) |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    ideal = med("a_ideal")
    names = [("a_dynamic", "weft --balance dynamic"), ("a_static", "weft --balance static"),
             ("a_none", "weft --balance none (equal shares, BSP)"),
             ("a_ddp", "PyTorch DDP (gloo), rank 3 throttled"),
             ("a_ideal", "ideal: 4 independent weft processes, the 4th throttled, summed")]
    for k, name in names:
        if k not in rows:
            continue
        last = rows[k][-1][4] if len(rows[k][-1]) > 4 else "-"
        if k == "a_ideal":
            last = "rates " + last
        # DDP's figure is over all its steps: compared with the ideal's whole-run figure.
        ratio = med(k, 3) / med("a_ideal", 3) if k == "a_ddp" else med(k) / ideal
        rate = "-" if k == "a_ddp" else "%.0f" % med(k)
        thr = ", ".join("%.0f%%" % (100 * float(r[5])) for r in rows[k] if len(r) > 5)
        print(f"| {name} | {rate} | {med(k, 3):.0f} | {pct(ratio)} | {fmt_runs(k)} | {thr or '-'} | {last} |")
    print()
    print("Worker 3 throttled: the share of its cgroup's quota periods in which the quota stopped it, "
          "per run (low figures mean the machine was so busy that worker 3 got less than its quota "
          "anyway, and the run says little about balancing).")
    print("DDP reports samples/s over all its steps: its ratio is to the ideal's whole-run figure "
          f"({med('a_ideal', 3):.0f}). Targets: dynamic >= 90% of the ideal.")
    for k in ("a_dynamic", "a_static", "a_ddp"):
        if k in rows and "a_none" in rows:
            i = 3 if k == "a_ddp" else 2
            print(f"- {k[2:]} / none: {med(k, i) / med('a_none', i):.2f}x")

def load_b(path):
    marks, prog, events = [], [], []
    for line in open(path):
        t, _, text = line.rstrip("\n").partition("\t")
        t = float(t)
        if text.startswith("#quota"):
            marks.append((t, text.split()[1]))
            continue
        m = re.search(r"epoch (\d+)/\d+\s+step (\d+)/(\d+)", text)
        if m:
            e, k, s = map(int, m.groups())
            prog.append((t, (e - 1) * s + k))
        if '"replan"' in text and "{" in text:
            try:
                ev = json.loads(text[text.index("{"):])
            except ValueError:
                continue
            if ev.get("event") == "replan":
                events.append((t, int(ev["step"]), list(ev["shares"]), list(ev.get("rates", []))))
    return marks, prog, events

def step_at(t, prog, events):
    pts = sorted(set(prog)) or sorted((e[0], e[1]) for e in events)
    before = [p for p in pts if p[0] <= t]
    after = [p for p in pts if p[0] > t]
    if before and after:
        (ta, sa), (tb, sb) = before[-1], after[0]
        return sa + (sb - sa) * (t - ta) / (tb - ta) if tb > ta else sa
    if before:
        return before[-1][1]
    return None

if glob.glob(os.path.join(out, "keep-b-*.log")):
    print()
    bw = int(meta.get("b_workers", 4))
    print(f"#### b) Worker {bw - 1}'s quota changed while training ({bw} workers, --balance dynamic): "
          f"100% -> 25% at {t1} s, "
          f"back to 100% at {t2} s, stopped at {t3} s")
    print()
    print("| round | change | at step | the slow worker's share before -> settled | steps to 90% of the way | "
          "steps to within 10% of settled | direction changes after settling (re-plans) | "
          "share range after settling |")
    print("| ---: | --- | ---: | --- | ---: | ---: | --- | --- |")
    follow_all = []
    within_all = []
    osc_all = []
    for path in sorted(glob.glob(os.path.join(out, "keep-b-*.log"))):
        r = int(re.search(r"keep-b-(\d+)", path).group(1))
        marks, prog, events = load_b(path)
        if not events:
            print(f"| {r} | - | - | no replan events in the job's output | - | - | - |")
            continue
        events.sort(key=lambda e: e[0])
        times = [t for t, _ in marks] + [float("inf")]
        for i, (t, q) in enumerate(marks):
            c = step_at(t, prog, events)
            if c is None:
                continue
            label = "to 100%" if q in ("max", "100") else f"to {q}%"
            # Events are placed by the time they were printed: before the
            # change, or in the phase up to the next change.
            old = [e for e in events if e[0] <= t]
            phase = [e for e in events if t < e[0] < times[i + 1]]
            if not phase:
                print(f"| {r} | {label} | {c:.0f} | (no re-plan after the change) | - | - | - |")
                continue
            if old:
                old3, old_text = old[-1][2][-1], str(old[-1][2][-1])
            else:  # no re-plan yet: the shares were still the equal ones
                old3 = sum(phase[0][2]) / len(phase[0][2])
                old_text = f"{old3:.0f} (equal)"
            # Where it settled: the median of the re-plans in the second
            # half of the phase (one re-plan alone carries the rates' noise).
            end = times[i + 1] if times[i + 1] != float("inf") else phase[-1][0]
            half = (t + end) / 2
            late = [e[2][-1] for e in phase if e[0] >= half] or [phase[-1][2][-1]]
            settled = statistics.median(late)
            dist = settled - old3
            mean_share = sum(phase[-1][2]) / len(phase[-1][2])
            if abs(dist) < 0.05 * mean_share:
                print(f"| {r} | {label} | {c:.0f} | {old_text} -> {settled:.0f} (no move to follow) "
                      "| - | - | - | - |")
                continue
            # Followed: the first re-plan that has covered 90% of the way;
            # within: the first within 10% of the way from the settled share.
            k = next((e for e in phase if (e[2][-1] - old3) / dist >= 0.9), phase[-1])
            w = next((e for e in phase if abs(e[2][-1] - settled) <= 0.1 * abs(dist)), phase[-1])
            follow = max(0.0, k[1] - c)
            within = max(0.0, w[1] - c)
            follow_all.append(follow)
            within_all.append(within)
            after = [e[2][-1] for e in phase if e[0] >= k[0]]
            diffs = [b - a for a, b in zip(after, after[1:]) if b != a]
            flips = sum(1 for a, b in zip(diffs, diffs[1:]) if (a > 0) != (b > 0))
            osc_all.append(flips)
            print(f"| {r} | {label} | {c:.0f} | {old_text} -> {settled:.0f} | {follow:.0f} | {within:.0f} "
                  f"| {flips} ({len(after) - 1}) | {min(after)}..{max(after)} |")
    if follow_all:
        print()
        print(f"Median steps to follow (90% of the way): {statistics.median(follow_all):.0f} "
              f"(target: within 20); largest {max(follow_all):.0f}. Median steps to within 10% of "
              f"the settled share: {statistics.median(within_all):.0f}. Direction changes after "
              f"settling: at most {max(osc_all)} per phase (0 or 1: the changes die out).")
    print()
    print("(The step of a change is placed from rank 0's progress line, read a few times a second. "
          "The share it settled at is the median of the re-plans in the second half of the phase. "
          "It counts as followed at the first re-plan that has covered 90% of the distance from "
          "the share before the change to the settled one; the stricter column waits for the "
          "first re-plan within 10% of that distance of the settled share, which the rates' noise "
          "on a crowded machine can delay long after the move.)")

if "c_dynamic" in rows:
    print()
    print("#### c) Equal workers (nothing throttled)")
    print()
    print("| setting | samples/s, median | whole run | runs (foreign) |")
    print("| --- | ---: | ---: | --- |")
    for k, name in [("c_dynamic", "weft --balance dynamic"), ("c_none", "weft --balance none"),
                    ("c_ideal", "ideal: 4 independent processes (for d)")]:
        if k in rows:
            print(f"| {name} | {med(k):.0f} | {med(k, 3):.0f} | {fmt_runs(k)} |")
    print()
    clean = med('c_dynamic', clean=True) / med('c_none', clean=True)
    print(f"dynamic / none: {med('c_dynamic') / med('c_none'):.3f} (target: >= 0.98; ratios within "
          "5% are equal on these machines); clean runs only (foreign < 10%): "
          + ("none were clean" if clean != clean else f"{clean:.3f}"))

if "d_dynamic" in rows:
    print()
    print("#### d) A CPU hog (busy loop) in worker 3's cgroup")
    print()
    print("| setting | samples/s with the hog, median | without (c) | slowdown | hog's share of the machine | slowdown / share | runs (foreign) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for k, base, name in [("d_dynamic", "c_dynamic", "weft --balance dynamic"),
                          ("d_none", "c_none", "weft --balance none"),
                          ("d_ideal", "c_ideal", "ideal: 4 independent processes, the 4th beside the hog")]:
        if k not in rows:
            continue
        # per round: slowdown against the same round's run without the hog
        base_by_round = {r[0]: float(r[2]) for r in rows[base]}
        slow = [1 - float(r[2]) / base_by_round[r[0]] for r in rows[k] if r[0] in base_by_round]
        share = [float(r[5]) for r in rows[k]]
        s, c = statistics.median(slow), statistics.median(share)
        print(f"| {name} | {med(k):.0f} | {med(base):.0f} | {pct(s)} | {pct(c)} | {s / c:.2f} | {fmt_runs(k)} |")
    print()
    print("Slowdown per round against the same round's run without the hog, then the median. Target "
          "(dynamic): slowdown / share <= 1 (no more than in proportion to the capacity taken). "
          "The ideal's row is the machine's own figure: 4 independent processes, the 4th beside "
          "the hog, against 4 with nothing beside them (c).")

if "acc_throttled" in rows:
    print()
    print(f"#### Test accuracy after {acc_epochs} epoch(s), worker 3 throttled to 25% vs unthrottled (--balance dynamic)")
    print()
    print("| seed | throttled | unthrottled |")
    print("| ---: | ---: | ---: |")
    un = {r[0]: r[2] for r in rows.get("acc_unthrottled", [])}
    for r in rows["acc_throttled"]:
        print(f"| {r[0]} | {float(r[2]):.4f} | {float(un.get(r[0], 'nan')):.4f} |")
    a, b = med("acc_throttled"), med("acc_unthrottled")
    print()
    print(f"median: throttled {a:.4f}, unthrottled {b:.4f}: {100 * (a - b):+.2f} pp (target: within 0.5 pp)")
