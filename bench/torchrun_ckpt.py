"""PyTorch DDP under torchrun --max_restarts, with a checkpoint each epoch.

The peer of bench/restart_compare.py (issue 11: time lost per failure).
The model, data and optimizer are those of ../shared/anchors/torch_ddp_fmnist.py
(imported from it): the CNN, SGD lr 0.05 momentum 0.9, batch 64 per worker,
one intra-op thread. What torchrun's documentation asks of a script that is
to survive restarts is added: every worker loads the newest checkpoint at
start when there is one, and rank 0 saves one at the end of each epoch
(model, optimizer, epoch; written to a temporary file and renamed).

    python3 -m torch.distributed.run --standalone --nproc_per_node 4 \
        --max_restarts 3 --redirects 2 --tee 1 bench/torchrun_ckpt.py \
        --anchors ../shared/anchors --checkpoint-dir DIR --epochs 3 --train-samples 12000

Rank 0 prints a JSON line when it starts (with TORCHELASTIC_RESTART_COUNT
and the epoch it resumes at) and one per epoch (time, test accuracy).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--anchors", required=True, help="the directory of torch_ddp_fmnist.py")
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-samples", type=int, default=12000)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    a = p.parse_args()
    sys.path.insert(0, a.anchors)
    import torch_ddp_fmnist as anchor  # noqa: E402 (the peer's own model and data)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    d = anchor.D
    xtr = torch.from_numpy(anchor.idx(f"{d}/train-images-idx3-ubyte.gz").astype(np.float32) / 255.0)
    ytr = torch.from_numpy(anchor.idx(f"{d}/train-labels-idx1-ubyte.gz").astype(np.int64))
    xte = torch.from_numpy(anchor.idx(f"{d}/t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0)
    yte = torch.from_numpy(anchor.idx(f"{d}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    n = min(a.train_samples, xtr.shape[0])
    xtr, ytr = xtr[:n], ytr[:n]
    xte, yte = xte[:a.test_samples], yte[:a.test_samples]

    model = anchor.CNN()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    path = os.path.join(a.checkpoint_dir, "checkpoint.pt")
    start = 0
    if os.path.exists(path):
        state = torch.load(path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if rank == 0:
        print(json.dumps({"event": "start", "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                          "resume_epoch": start, "world": world}), flush=True)
    per = n // world
    g = torch.Generator()
    for ep in range(start, a.epochs):
        g.manual_seed(ep)
        perm = torch.randperm(n, generator=g)[rank * per:(rank + 1) * per]
        t0 = time.time()
        steps = 0
        for i in range(0, per - a.batch + 1, a.batch):
            b = perm[i:i + a.batch]
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
            steps += 1
        if rank == 0:
            tmp = path + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": ep}, tmp)
            os.replace(tmp, path)
        dist.barrier()
        if rank == 0:
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            print(json.dumps({"epoch": ep + 1, "seconds": round(time.time() - t0, 2), "steps": steps,
                              "test_accuracy": round(acc, 4)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
