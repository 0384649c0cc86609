"""Loader throughput: tokens/s one rank gets from TrainLoader with N worker processes.

    python tools/bench_loader.py --data data/sp2014 --tokens_per_rank 65536 --workers 1 2 4 8
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import time

import torch

from dataloader import TrainLoader

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", type=Path, required=True, help="folder with *_train_*.bin shards")
p.add_argument("--tokens_per_rank", type=int, default=65536)
p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="worker counts to try")
p.add_argument("--steps", type=int, default=300, help="micro-batches timed per worker count (after 20 untimed)")
p.add_argument("--max_len", type=int, default=1024)
p.add_argument("--mask_scheme", default="mask", choices=["mask", "80/10/10"])
p.add_argument("--world_size", type=int, default=1, help="rank 0 of this many reads every world_size-th micro-batch")
a = p.parse_args()
files = sorted(a.data.glob("*_train_*.bin"))
if not files:
    sys.exit(f"bench_loader.py: no *_train_*.bin shards in {a.data}; make them with data/prepare.py")
pin = torch.cuda.is_available()
print(f"{len(files)} train shards in {a.data}, {a.tokens_per_rank:,} tokens per micro-batch, pinned memory: {pin}")
for workers in a.workers:
    with TrainLoader(files, a.tokens_per_rank, world_size=a.world_size, max_len=a.max_len,
                     mask_scheme=a.mask_scheme, num_workers=workers, pin_memory=pin) as loader:
        for _ in range(20):  # workers start, queues fill
            next(loader)
        t = time.perf_counter()
        for _ in range(a.steps):
            next(loader)
        rate = a.steps * a.tokens_per_rank / (time.perf_counter() - t)
    print(f"workers {workers:2d}: {rate / 1e6:6.1f}M tokens/s per rank "
          f"({rate / a.tokens_per_rank:,.0f} micro-batches/s)", flush=True)
