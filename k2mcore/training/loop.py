"""The training loop: groups -> model -> DDP -> ZeRO-1 AdamW -> data -> steps -> metrics.

Each arrow is one call; checkpoints, fault handling and MuonClip come with their own modules.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from k2mcore.config.schema import K2Config


def build_optimizer(cfg: K2Config, model: list):
    """megatron's optimizer: Adam with decoupled weight decay (AdamW), ZeRO-1 when configured."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    if o.name != "adamw":
        raise NotImplementedError(f"optimizer.name={o.name!r}: only adamw is implemented so far")
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=cfg.train.clip_grad, bf16=model[0].config.bf16,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
        use_gloo_process_groups=False,
    )
    iters = cfg.train.iters
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(iters, o.warmup_iters + 1),
        lr_decay_style=o.decay_style if o.decay_style != "wsd" else "WSD",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, iters // 10) if o.decay_style == "wsd" else None,
    )
    return opt, sched


def train(cfg: K2Config, data: Optional[Iterator[dict]] = None) -> list[dict]:
    """Train for `cfg.train.iters` steps; returns the metrics rows (rank 0 writes them too)."""
    from megatron.core import parallel_state as ps

    from k2mcore.model.build import build_model
    from k2mcore.parallel.groups import init_distributed

    from .step import forward_backward, wrap_ddp

    init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = wrap_ddp(build_model(cfg), distributed_optimizer=cfg.parallel.distributed_optimizer)
    optimizer, scheduler = build_optimizer(cfg, model)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if data is None:
        from k2mcore.data import build_data_iterator

        data = build_data_iterator(cfg, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=0)
    t = cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
    rank0 = dist.get_rank() == 0
    metrics_path = os.path.join(cfg.run.dir, "metrics.jsonl")
    if rank0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        open(metrics_path, "w").close()
    rows = []
    for step in range(1, t.iters + 1):
        start = time.perf_counter()
        batches = [next(data) for _ in range(n_micro)]
        loss = forward_backward(model, batches, seq_length=t.seq_length,
                                micro_batch_size=t.micro_batch_size)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step applies
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        elapsed = time.perf_counter() - start
        row = {
            "step": step, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": t.global_batch_size * t.seq_length / elapsed,
            "skipped": int(not ok),
        }
        rows.append(row)
        if rank0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if step % cfg.logging.interval == 0 or step == t.iters:
                print(f"step {step:5d} | loss {loss:.4f} | lr {row['lr']:.2e} | "
                      f"grad norm {row['grad_norm']:.3f} | {row['tokens_per_s']:.0f} tok/s",
                      flush=True)
    return rows
