"""Runs the DDP anchor (../shared/anchors/torch_ddp_fmnist.py) unchanged, one rank in this
process, and records for each optimizer step its end time (time.time(), comparable across the
processes of the machine) and the tx_bytes of this host's interface, so that bench/compression.sh
measures DDP's step time and bytes per step the way it measures Weft's. Prints at exit one line:

  DDPSTEPS {"rank": R, "t": [...], "tx": [...]}

Usage: /usr/bin/python3 compression_ddp.py ANCHOR.py ANCHOR_ARGS... (with --rank and --ifname)
"""
import atexit
import json
import runpy
import sys
import time

import torch

anchor = sys.argv[1]
args = sys.argv[2:]


def arg(name, default):
    return args[args.index(name) + 1] if name in args else default


rank = int(arg("--rank", "0"))
ifname = arg("--ifname", "") or "lo"
counter = f"/sys/class/net/{ifname}/statistics/tx_bytes"
times, tx = [], []


def read_tx():
    try:
        with open(counter) as f:
            return int(f.read())
    except OSError:
        return -1


step = torch.optim.SGD.step


def timed_step(self, *a, **k):
    r = step(self, *a, **k)
    times.append(time.time())
    tx.append(read_tx())
    return r


torch.optim.SGD.step = timed_step
atexit.register(
    lambda: print("DDPSTEPS " + json.dumps({"rank": rank, "t": times, "tx": tx}), flush=True))
sys.argv = [anchor] + args
runpy.run_path(anchor, run_name="__main__")
