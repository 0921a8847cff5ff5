"""Report of bench/compression.sh: reads OUT/results.jsonl and OUT/meta.txt, writes
OUT/report.md (markdown tables for BENCHMARKS.md) and two PNGs (accuracy against computed time
per link, bytes per step). Method: see the header of bench/compression.sh.

  /usr/bin/python3 bench/compression_report.py OUT [--png-dir DIR]
  /usr/bin/python3 bench/compression_report.py OUT --pick-e2e LINK
      prints "SETTING EPOCHS": the Weft setting with the shortest computed time to the target
      accuracy on LINK and the epochs its accuracy run took to reach it (nothing if none did)
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter

TARGET = 0.88
ORDER = ["none", "fp16", "bf16", "int8", "topk:0.01", "sign", "powersgd:4", "auto", "local-sgd",
         "ddp", "ddp-fp16"]
NAMES = {"none": "Weft, uncompressed BSP", "local-sgd": "Weft, local SGD (H=8)",
         "ddp": "PyTorch DDP", "ddp-fp16": "PyTorch DDP, fp16 hook"}
LINK_NAMES = {"10mbit": "10 Mbit/s", "100mbit": "100 Mbit/s", "1gbit": "1 Gbit/s",
              "unshaped": "unshaped"}


def name(s):
    return NAMES.get(s, f"Weft, {s}")


def order_key(s):
    return (ORDER.index(s) if s in ORDER else len(ORDER), s)


def is_ddp(s):
    return s.startswith("ddp")


def fmt_s(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return f"{b / div:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_time(t):
    if t is None:
        return "-"
    return f"{t:.0f} s" if t >= 100 else f"{t:.1f} s"


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def median(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def load(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl")) if l.strip()]
    meta = {}
    path = os.path.join(out, "meta.txt")
    if os.path.exists(path):
        for line in open(path):
            k, _, v = line.rstrip("\n").partition(" ")
            meta[k] = v
    return rows, meta


def weft_steps(e):
    """Steps of one Weft epoch from its JSON object."""
    return math.ceil(e["samples_this_run"] / e["global_batch"])


def codec_in_use(run):
    """The "compress" field of a Weft run's last epoch ("auto->int8"), or None."""
    eps = run.get("epochs") or []
    return eps[-1].get("compress") if eps else None


def wire_model(run):
    eps = run.get("epochs") or []
    return eps[-1].get("wire_bytes_per_step") if eps else None


def ddp_rank0(run):
    d = run.get("ddp_steps", {}).get("0")
    return d["t"] if d else []


def step_time(run):
    """Seconds per step after the first 20 steps (Weft: its samples_per_s; DDP: the same window
    of rank 0's step end times), the steps of the run and the end time of its last step."""
    if is_ddp(run["setting"]):
        t = ddp_rank0(run)
        n = len(t)
        if n < 2:
            return None, n, None
        w = 20 if n > 20 else 1
        return (t[-1] - t[w - 1]) / (n - w), n, t[-1]
    eps = run.get("epochs") or []
    if not eps:
        return None, 0, None
    e = eps[-1]
    n = weft_steps(e)
    rate = e["samples_per_s"] if n > 20 else e["samples_per_s_all"]
    # The JSON line arrives after a barrier and the evaluation of a 256-sample test set.
    return e["global_batch"] / rate, n, e.get("t_arrived")


def host_bytes(run):
    """Mean over the hosts of the bytes each sent during the run (tx_bytes of eth0)."""
    d = [b - a for a, b in zip(run["tx_start"], run["tx_end"])]
    return sum(d) / len(d)


def accuracy_table(rows):
    acc = {}
    for r in rows:
        if r["phase"] != "accuracy":
            continue
        eps = r.get("epochs") or []
        accs, cum, steps = [], 0, []
        for e in eps:
            cum += e["steps"] if is_ddp(r["setting"]) else weft_steps(e)
            accs.append(e["test_accuracy"])
            steps.append(cum)
        s88 = next((st for a, st in zip(accs, steps) if a >= TARGET), None)
        e88 = next((i + 1 for i, a in enumerate(accs) if a >= TARGET), None)
        st, _, _ = step_time(r)
        if not is_ddp(r["setting"]) and eps:
            st = median([e["global_batch"] / e["samples_per_s"] for e in eps])
        acc[r["setting"]] = {"acc": accs, "cum_steps": steps, "steps88": s88, "epoch88": e88,
                             "codec": None if is_ddp(r["setting"]) else codec_in_use(r),
                             "step_s": st, "wire": wire_model(r), "wall": r["wall_s"]}
    return acc


def timing_table(rows):
    """{link: {setting: figures}} from the timing runs, medians over rounds."""
    by = {}
    for r in rows:
        if r["phase"] == "timing":
            by.setdefault(r["link"], {}).setdefault(r["setting"], []).append(r)
    res = {}
    for link, sets in by.items():
        res[link] = {}
        for s, runs in sets.items():
            per = []
            for r in runs:
                st, n, t_last = step_time(r)
                startup = None if st is None or t_last is None else t_last - r["t_start"] - n * st
                per.append({"round": r["round"], "steps": n, "step_s": st, "startup_s": startup,
                            "bytes": host_bytes(r), "foreign": r["foreign"],
                            "codec": None if is_ddp(s) else codec_in_use(r), "wire": wire_model(r)})
            ns = sorted({p["steps"] for p in per})
            if len(ns) >= 2:
                # Least squares of bytes over steps: the slope is per step, the start-up cancels.
                xs = [p["steps"] for p in per]
                ys = [p["bytes"] for p in per]
                mx, my = statistics.fmean(xs), statistics.fmean(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                bps, bytes_method = slope, "difference"
                startup_bytes = my - slope * mx
            else:
                bps = median([p["bytes"] / p["steps"] for p in per if p["steps"]])
                bytes_method, startup_bytes = "whole run / steps", None
            inproc = []  # DDP: the per-step counters its processes read, steps 21..N
            for r in runs:
                for d in r.get("ddp_steps", {}).values():
                    tx = d.get("tx") or []
                    if len(tx) > 21 and min(tx) >= 0:
                        inproc.append((tx[-1] - tx[19]) / (len(tx) - 20))
            codecs = Counter(p["codec"] for p in per if p["codec"])
            res[link][s] = {"runs": per, "step_s": median([p["step_s"] for p in per]),
                            "startup_s": median([p["startup_s"] for p in per]),
                            "bytes_per_step": bps, "bytes_method": bytes_method,
                            "startup_bytes": startup_bytes,
                            "codec": codecs.most_common(1)[0][0] if codecs else None,
                            "wire": median([p["wire"] for p in per]),
                            "foreign": median([p["foreign"] for p in per]),
                            "inproc_bytes": median(inproc)}
    return res


def chosen(codec):
    """The codec auto chose, from "auto->int8" or "auto->powersgd:4(... values in 2 matrices)"
    (or None)."""
    if codec and "->" in codec:
        return codec.split("->", 1)[1].split("(", 1)[0].strip()
    return None


def time88(link_fig, acc, s):
    """Computed time to the target accuracy: (seconds, steps, note)."""
    f = link_fig.get(s)
    if not f or f["step_s"] is None:
        return None, None, "no timing"
    src, note = s, ""
    if s == "auto":
        c = chosen(f["codec"])
        if c and c in acc and c != "auto":
            src, note = c, f"steps of {c}"
    a = acc.get(src)
    if not a:
        return None, None, "no accuracy run"
    if a["steps88"] is None:
        return None, None, f"< {TARGET:.0%} in {len(a['acc'])} epochs"
    return (f["startup_s"] or 0.0) + a["steps88"] * f["step_s"], a["steps88"], note


def time88_or_bound(link_fig, acc, s):
    """(seconds, kind): kind "=" for the computed time to the target, ">" for a lower bound
    (start-up + all the accuracy run's steps x step time) where the target was not reached,
    None where nothing can be said."""
    t, _, _ = time88(link_fig, acc, s)
    if t is not None:
        return t, "="
    f = link_fig.get(s)
    src = s
    if s == "auto" and f and chosen(f["codec"]) in acc:
        src = chosen(f["codec"])
    a = acc.get(src)
    if f and f["step_s"] is not None and a and a["cum_steps"] and a["steps88"] is None:
        return (f["startup_s"] or 0.0) + a["cum_steps"][-1] * f["step_s"], ">"
    return None, None


def fmt_ratio_b(ref, this):
    """ref / this where either may be a lower bound."""
    (a, ka), (b, kb) = ref, this
    if a is None or b is None or b <= 0 or ka is None or kb is None:
        return "-"
    if ka == "=" and kb == "=":
        return fmt_ratio(a / b)
    if ka == ">" and kb == "=":
        return "> " + fmt_ratio(a / b)
    if ka == "=" and kb == ">":
        return "< " + fmt_ratio(a / b)
    return "-"


def links_in_order(timing):
    known = ["10mbit", "100mbit", "1gbit", "unshaped"]
    return [l for l in known if l in timing] + sorted(l for l in timing if l not in known)


def pick_e2e(rows, link):
    acc, timing = accuracy_table(rows), timing_table(rows)
    best = None
    for s in timing.get(link, {}):
        if is_ddp(s):
            continue
        t, _, _ = time88(timing[link], acc, s)
        if t is not None and (best is None or t < best[0]):
            best = (t, s)
    if best:
        s = best[1]
        src = chosen(timing[link][s]["codec"]) if s == "auto" else s
        e = acc.get(src if src in acc else s, {}).get("epoch88")
        if e:
            print(s, e)


def plots(acc, timing, png_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    links = links_in_order(timing)
    files = []
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    settings = sorted({s for l in links for s in timing[l]} | set(acc), key=order_key)
    weft = [s for s in settings if not is_ddp(s)]
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(weft)}
    colors.update({"ddp": "black", "ddp-fp16": "dimgrey"})
    if links and acc:
        cols = min(2, len(links))
        rws = math.ceil(len(links) / cols)
        fig, axes = plt.subplots(rws, cols, figsize=(5.2 * cols, 3.6 * rws), squeeze=False)
        for ax, link in zip(axes.flat, links):
            for s in settings:
                f = timing[link].get(s)
                src = s
                if s == "auto" and f and chosen(f["codec"]) in acc:
                    src = chosen(f["codec"])
                a = acc.get(src)
                if not f or not a or f["step_s"] is None:
                    continue
                xs = [(f["startup_s"] or 0) + n * f["step_s"] for n in a["cum_steps"]]
                ax.plot(xs, a["acc"], marker="o", ms=3, lw=1.2, color=colors[s],
                        ls="--" if is_ddp(s) else "-", label=s)
            ax.axhline(TARGET, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            subs = (1.0, 2.0, 5.0) if hi / lo > 8 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"links {LINK_NAMES.get(link, link)}", fontsize=9)
            ax.set_xlabel("computed time, s (start-up + steps x step time)", fontsize=8)
            ax.set_ylabel("test accuracy", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both")
        for ax in list(axes.flat)[len(links):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6, ncol=2)
        fig.suptitle("Fashion-MNIST CNN, 4 emulated hosts: test accuracy per epoch against time",
                     fontsize=10)
        fig.tight_layout()
        p = os.path.join(png_dir, "compression_accuracy_time.png")
        fig.savefig(p, dpi=80)
        plt.close(fig)
        files.append(p)
    if links:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(settings) + 1.4))
        h = 0.8 / len(links)
        mx, my = [], []
        for j, link in enumerate(links):
            ys, vs = [], []
            for i, s in enumerate(settings):
                f = timing[link].get(s)
                if f and f["bytes_per_step"] and f["bytes_per_step"] > 0:
                    ys.append(i + j * h)
                    vs.append(f["bytes_per_step"])
                if f and f["wire"]:
                    mx.append(f["wire"])
                    my.append(i + j * h)
            ax.barh(ys, vs, height=h, label=f"measured, {LINK_NAMES.get(link, link)}")
        if mx:
            ax.plot(mx, my, "k|", ms=9, mew=1.5, label="Weft's model (wire_bytes_per_step)")
        ax.set_yticks([i + 0.4 - h / 2 for i in range(len(settings))])
        ax.set_yticklabels(settings, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        vals = [timing[l][s]["bytes_per_step"] for l in links for s in timing[l]
                if timing[l][s]["bytes_per_step"] and timing[l][s]["bytes_per_step"] > 0]
        if vals:
            ax.set_xlim(left=min(vals + mx) / 3, right=max(vals + mx) * 2)
        ax.set_xlabel("bytes sent per host per step (tx_bytes of the host's eth0)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
        ax.grid(alpha=0.3, axis="x", which="both")
        fig.tight_layout()
        p = os.path.join(png_dir, "compression_bytes.png")
        fig.savefig(p, dpi=80)
        plt.close(fig)
        files.append(p)
    return files


def report(out, png_dir, rows, meta):
    acc, timing = accuracy_table(rows), timing_table(rows)
    links = links_in_order(timing)
    L = []
    p = L.append
    p("## Gradient compression: Weft's codecs, local SGD and PyTorch DDP on 4 emulated hosts "
      "(generated)")
    p("")
    p(f"`bench/compression.sh` ({meta.get('date', '?')}, commit {meta.get('commit', '?')}, "
      f"{meta.get('elapsed_s', '?')} s in all{', --quick' if meta.get('quick') == '1' else ''}): "
      f"CPU {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, kernel {meta.get('kernel', '?')}. "
      "4 network namespaces (one worker each) on a bridge, each link shaped by tbf in both "
      "directions (scripts/cluster.sh). The CNN of ../shared/anchors/torch_ddp_fmnist.py, batch 64 "
      "per worker (global 256), SGD lr 0.05 momentum 0.9, constant rate, 1 intra-op thread per "
      f"worker, seed 0, Weft `--balance {meta.get('balance', 'none')}`; DDP is the anchor "
      "(gloo), `--hook none` or `fp16`.")
    p("")
    p("Method (the machine has 2 cores: training every setting to 88% on every link would take "
      "hours):")
    p(f"1. accuracy: each setting once on unshaped links for {meta.get('epochs', '?')} epoch(s), "
      "test accuracy on the 10k test set after each epoch; steps to 88% at epoch granularity;")
    p(f"2. timing, per link: short runs ({meta.get('rounds', '?')} round(s), settings "
      "alternating; odd rounds N steps, even rounds more): step time after the first 20 steps, "
      "start-up = time from launch to the end of the last step less the steps x step time, bytes "
      "per host per step from tx_bytes of each host's eth0 (Weft and DDP alike; headers "
      "included), as the difference between the longer and the shorter runs over the extra steps "
      "(start-up traffic cancels); medians over rounds;")
    p("3. time to 88% = start-up + steps to 88% (1) x step time (2): **computed**, not measured; "
      "evaluation time left out. For auto, the steps of the codec it chose on that link.")
    if meta.get("accuracy_from"):
        p("")
        made = meta.get("accuracy_made", "-")
        p(f"The accuracy runs (1) are those of an earlier run ({meta['accuracy_from']}), "
          + ("except " + ", ".join(made.split()) + ", made in this run; "
             if made != "-" else "") + "this run made the timing runs.")
    p("")
    if acc:
        ne = max(len(a["acc"]) for a in acc.values())
        p(f"### Accuracy (unshaped links, {ne} epoch(s))")
        p("")
        p("| setting | codec in use | " + " | ".join(f"epoch {i + 1}" for i in range(ne)) +
          " | steps to 88% | step time in this run |")
        p("| --- | --- |" + " ---: |" * ne + " ---: | ---: |")
        for s in sorted(acc, key=order_key):
            a = acc[s]
            cells = [f"{x:.4f}" for x in a["acc"]] + ["-"] * (ne - len(a["acc"]))
            p(f"| {name(s)} | {a['codec'] or '-'} | " + " | ".join(cells) +
              f" | {a['steps88'] if a['steps88'] is not None else 'not reached'} | "
              f"{fmt_s(a['step_s'])} s |")
        p("")
        if "none" in acc:
            base = acc["none"]["acc"][-1]
            diffs = ", ".join(f"{s} {100 * (acc[s]['acc'][-1] - base):+.2f}"
                              for s in sorted(acc, key=order_key) if s != "none" and acc[s]["acc"])
            p(f"Final accuracy against uncompressed BSP, percentage points (one seed): {diffs}.")
            p("")
    if "auto" not in acc and any("auto" in timing[l] for l in links):
        p("auto had no accuracy run of its own (each of its candidates had one): its time to 88% "
          "takes the steps of the codec it chose on each link.")
        p("")
    for link in links:
        fig = timing[link]
        p(f"### Links {LINK_NAMES.get(link, link)}")
        p("")
        p("| setting | codec in use | step time, s (rounds) | start-up, s | bytes/step per host, "
          "measured | Weft's model | time to 88% (computed) | DDP fp16 / this | uncompressed / "
          "this | foreign CPU |")
        p("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        b_ddp16 = time88_or_bound(fig, acc, "ddp-fp16")
        b_none = time88_or_bound(fig, acc, "none")
        for s in sorted(fig, key=order_key):
            f = fig[s]
            t, _, note = time88(fig, acc, s)
            b = time88_or_bound(fig, acc, s)
            rounds = ", ".join(fmt_s(r["step_s"]) for r in f["runs"])
            if t is not None:
                tt = fmt_time(t) + (f" ({note})" if note else "")
            elif b[1] == ">":
                tt = f"> {fmt_time(b[0])} ({note})"
            else:
                tt = f"- ({note})"
            bm = fmt_bytes(f["bytes_per_step"]) + ("" if f["bytes_method"] == "difference" else "*")
            p(f"| {name(s)} | {f['codec'] or '-'} | {fmt_s(f['step_s'])} ({rounds}) | "
              f"{fmt_s(f['startup_s'], 1)} | {bm} | {fmt_bytes(f['wire'])} | {tt} | "
              f"{fmt_ratio_b(b_ddp16, b)} | {fmt_ratio_b(b_none, b)} | "
              f"{100 * (f['foreign'] or 0):.0f}% |")
        p("")
        chk = [f"{s} {fmt_bytes(fig[s]['inproc_bytes'])}" for s in sorted(fig, key=order_key)
               if fig[s].get("inproc_bytes")]
        if chk:
            p("Cross-check of the bytes: DDP's processes read their own counter at each step; "
              f"over steps 21..N per host: {', '.join(chk)}.")
            p("")
        if any(f["bytes_method"] != "difference" for f in fig.values()):
            p("\\* one step count only: the whole run's bytes over its steps, start-up traffic "
              "included.")
            p("")
    # Against the targets (statements of what was measured; nothing is asserted).
    p("### Against the targets")
    p("")

    def best_weft(link):
        fig = timing.get(link, {})
        cands = [(time88(fig, acc, s)[0], s) for s in fig if not is_ddp(s)]
        cands = [c for c in cands if c[0] is not None]
        return min(cands) if cands else (None, None)

    for link, goal in (("10mbit", 5.0), ("100mbit", 1.3)):
        if link not in timing:
            continue
        fig = timing[link]
        b16 = time88_or_bound(fig, acc, "ddp-fp16")
        ba = time88_or_bound(fig, acc, "auto")
        tb, sb = best_weft(link)
        bb = (tb, "=" if tb is not None else None)

        def verdict(ref, this):
            (a, ka), (b, kb) = ref, this
            if a is None or b is None or ka is None or kb != "=":
                return "-"
            r = a / b
            if ka == "=":
                return "met" if r >= goal else "missed"
            return "met" if r >= goal else "not decided (DDP's time is a lower bound)"

        def tm(b):
            return "-" if b[0] is None else ("> " if b[1] == ">" else "") + fmt_time(b[0])

        p(f"- {LINK_NAMES[link]}: time to 88% (computed) DDP fp16 {tm(b16)}; Weft auto "
          f"{tm(ba)} ({fmt_ratio_b(b16, ba)} shorter: {verdict(b16, ba)}); best Weft setting "
          f"{sb or '-'} {tm(bb)} ({fmt_ratio_b(b16, bb)}: {verdict(b16, bb)}); target >= {goal}x.")
    tk = [(l, timing[l]["topk:0.01"], timing[l].get("none")) for l in links
          if "topk:0.01" in timing[l]]
    if tk:
        rs = [ratio(n["bytes_per_step"], t["bytes_per_step"]) for _, t, n in tk if n]
        r = median(rs)
        p(f"- top-k 1%: {fmt_ratio(r)} fewer bytes per step than uncompressed (median over links; "
          f"{', '.join(fmt_ratio(x) for x in rs)}): target >= 50x: "
          f"{'-' if r is None else ('met' if r >= 50 else 'missed')}.")
        if "topk:0.01" in acc and "none" in acc:
            d = 100 * (acc["topk:0.01"]["acc"][-1] - acc["none"]["acc"][-1])
            p(f"  Final accuracy {acc['topk:0.01']['acc'][-1]:.4f} against {acc['none']['acc'][-1]:.4f}: "
              f"{d:+.2f} pp (target within 0.5 pp: {'met' if abs(d) <= 0.5 or d > 0 else 'missed'}; "
              "one seed, MEASURING.md asks 3 for a claim).")
    if "unshaped" in timing and "auto" in timing["unshaped"] and "none" in timing["unshaped"]:
        fa, fn = timing["unshaped"]["auto"], timing["unshaped"]["none"]
        per = []
        for ra in fa["runs"]:
            rn = next((x for x in fn["runs"] if x["round"] == ra["round"]), None)
            if rn and ra["step_s"] and rn["step_s"]:
                per.append(ra["step_s"] / rn["step_s"])
        r = ratio(fa["step_s"], fn["step_s"])
        ta, _, _ = time88(timing["unshaped"], acc, "auto")
        tn, _, _ = time88(timing["unshaped"], acc, "none")
        rt = ratio(ta, tn)
        p(f"- unshaped: auto ({fa['codec'] or '?'}) step time / uncompressed {fmt_ratio(r)} "
          f"(per round {', '.join(fmt_ratio(x) for x in per) or '-'}; start-up {fmt_s(fa['startup_s'], 1)} s "
          f"against {fmt_s(fn['startup_s'], 1)} s); time to 88% {fmt_ratio(rt)}; target: never more "
          f"than 5% slower: {'-' if r is None else ('met' if max(per + [r]) <= 1.05 else 'missed')} "
          "(ratios within 5% are equal on these machines).")
    p("")
    e2e = [r for r in rows if r["phase"] == "e2e"]
    if e2e:
        p("### End to end at 10 Mbit/s (cross-check of the computed time)")
        p("")
        for r in e2e:
            eps = r.get("epochs") or []
            hit = next((e for e in eps if e["test_accuracy"] >= TARGET), None)
            fig = timing.get(r["link"], {})
            tc, _, _ = time88(fig, acc, r["setting"])
            evals = [eps[i]["t_arrived"] - eps[i - 1]["t_arrived"] - eps[i]["seconds"]
                     for i in range(1, len(eps)) if "t_arrived" in eps[i]]
            ev = median(evals)
            n_ev = (eps.index(hit) + 1) if hit else len(eps)
            measured = hit["t_arrived"] - r["t_start"] if hit and "t_arrived" in hit else None
            p(f"- {name(r['setting'])} ({codec_in_use(r) or '-'}), {len(eps)} epoch(s): accuracy "
              f"{', '.join('%.4f' % e['test_accuracy'] for e in eps)}; measured from launch to the "
              f"epoch that reached 88%: {fmt_time(measured) if measured else 'not reached'}; "
              f"computed {fmt_time(tc)} (steps only)" +
              (f", {fmt_time(tc + n_ev * ev)} with {n_ev} evaluation(s) of {ev:.1f} s as measured "
               "in this run" if tc is not None and ev is not None else "") + ".")
        p("")
    return "\n".join(L), acc, timing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--png-dir")
    ap.add_argument("--pick-e2e")
    a = ap.parse_args()
    rows, meta = load(a.out)
    if a.pick_e2e:
        pick_e2e(rows, a.pick_e2e)
        return
    text, acc, timing = report(a.out, a.png_dir or a.out, rows, meta)
    png_dir = a.png_dir or a.out
    os.makedirs(png_dir, exist_ok=True)
    files = plots(acc, timing, png_dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if files:
        text += "\n### Plots\n\n"
        for f in files:
            rel = os.path.relpath(os.path.abspath(f), root)
            rel = rel if not rel.startswith("..") else os.path.abspath(f)
            text += f"![{os.path.basename(f)[:-4]}]({rel})\n\n"
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
