"""k2m-train's loop on rollouts (run by test_rl_training.py under torchrun, 2 ranks, DP2; R2
routing replay and the entropy bonus on): an uninterrupted run of 4 steps (two rollout batches
of two minibatches), and the same run stopped at step 3 (a checkpoint in the middle of the
second rollout batch) and resumed to 4.
Three runs share one launch because each process start costs seconds on 2 cores."""
from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from k2mcore.config.loader import load_config
from k2mcore.parallel.layout import resolve_layout
from k2mcore.training.loop import train


def _config(out: str, data: str, tokenizer: str, run: str, iters: int, *extra: str):
    return load_config("k2-tiny", [
        f"run.dir={os.path.join(out, run)}", f"train.iters={iters}", "train.seq_length=32",
        "train.global_batch_size=4", "train.micro_batch_size=1", "train.dtype=fp32",
        "train.eval_interval=0", "data.format=rollouts", f"data.blend={data}",
        f"data.tokenizer={tokenizer}", "data.loader=torch", "rl.minibatches=2",
        "rl.temperature=0.8", "rl.truncation_reward=-0.5", "optimizer.name=muonclip",
        "optimizer.lr=0.02", "optimizer.min_lr=0", "optimizer.decay_style=constant",
        "optimizer.warmup_iters=0",
        "qk_clip.threshold=1.0", "logging.tensorboard=false",
        # R2 routing replay: the resume must bring back the old pass's routes too
        "rl.routing_replay=old", "rl.entropy_coef=0.01", *extra])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = {}
    for run, iters, extra in (("whole", 4, ()), ("stopped", 3, ("checkpoint.interval=3",)),
                              ("stopped", 4, ("checkpoint.interval=3",))):
        cfg = _config(args.out, args.data, args.tokenizer, run, iters, *extra)
        rows.setdefault(run, []).extend(train(cfg, resolve_layout(cfg, world)))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "rows.json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
