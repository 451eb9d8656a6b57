"""One rank of test_loaders.test_under_a_gloo_process_group (launched by torchrun).

Builds the data iterator under a real gloo process group (megatron's dataset builder then
builds on rank 0 and synchronizes with barriers) with the default backend, and saves this rank's
micro-batches.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from k2mcore.config.loader import load_config  # noqa: E402
from k2mcore.data import build_data_iterator  # noqa: E402
from k2mcore.data.datasets import ASSETS_DIR  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--blend", required=True)
    p.add_argument("--cache", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config("k2-tiny", [
        f"data.blend={args.blend}", f"data.cache_dir={args.cache}", "data.loader=auto",
        f"data.tokenizer={ASSETS_DIR / 'tokenizer' / 'k2-tiny.tiktoken'}",
        "data.num_workers=1", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.iters=6", f"run.dir={args.out}",
    ])
    it = build_data_iterator(cfg, dp_rank=rank, dp_size=world, consumed_samples=8)
    batches = list(it)
    os.makedirs(args.out, exist_ok=True)
    torch.save({"backend": it.backend, "batches": batches}, f"{args.out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
