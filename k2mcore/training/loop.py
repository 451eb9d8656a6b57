"""The training loop: groups -> model -> DDP -> optimizer -> data -> steps -> metrics/checkpoints.

Each arrow is one call into a component package; the loop itself only sequences them.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional

import torch.distributed as dist

from k2mcore.config.schema import K2Config


def build_optimizer(cfg: K2Config, model: list):
    """megatron's optimizer (Adam with decoupled weight decay = AdamW; ZeRO-1 when the
    distributed optimizer is on) and its LR/WD scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
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
    iters = o.decay_iters or cfg.train.iters
    wsd = o.decay_style == "wsd"
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(iters, o.warmup_iters + 1),
        lr_decay_style="WSD" if wsd else o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant",
        wsd_decay_steps=(o.wsd_decay_iters or max(1, iters // 10)) if wsd else None,
        lr_wsd_decay_style=o.wsd_decay_style if wsd else None,
    )
    if o.name == "muonclip":
        _install_muonclip(cfg, opt, model)
    return opt, sched


def _install_muonclip(cfg: K2Config, opt, model: list) -> None:
    """megatron's distributed AdamW becomes MuonClip: Muon on the hidden matrices (sharded
    Newton-Schulz), AdamW on the rest, QK-Clip after each step (k2mcore.optim.megatron_muonclip)."""
    import torch

    from k2mcore.optim.distributed import MuonHyperParams
    from k2mcore.optim.megatron_muonclip import install_muonclip
    from k2mcore.optim.newton_schulz import resolve_coefficients

    m = cfg.optimizer.muon
    hparams = MuonHyperParams(
        momentum=m.momentum, nesterov=m.nesterov, ns_steps=m.ns_steps,
        coefficients=resolve_coefficients(m.coefficients), eps=1e-7,
        ns_dtype={"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[m.ns_dtype],
        lr_scale=m.lr_scale, weight_decay=m.weight_decay,
    )
    install_muonclip(
        opt, [getattr(c, "module", c) for c in model], hparams,
        router_in_muon=m.router_in_muon, split_gated=m.split_gated,
        qk_clip_threshold=cfg.qk_clip.threshold if cfg.qk_clip_active else None,
        qk_clip_alpha=cfg.qk_clip.alpha,
    )


def attention_report(cfg: K2Config, optimizer, model: list, stepped: bool) -> dict:
    """max_attn_logit (+ per layer, clipped_heads under QK-Clip) over all ranks; resets probes."""
    from megatron.core import parallel_state as ps

    from k2mcore.optim.megatron_muonclip import qk_clip_hook
    from k2mcore.optim.qk_clip import attn_logit_report

    hook = qk_clip_hook(_inner_optimizers(optimizer)) if cfg.qk_clip_active else None
    stats = hook.last_stats if hook is not None and stepped else None
    if hook is not None:
        hook.last_stats = None
    report = attn_logit_report(
        [getattr(c, "module", c) for c in model], cfg.model.num_layers, stats,
        count_clipped=ps.get_data_parallel_rank(with_context_parallel=True) == 0)
    if hook is None:
        return {"max_attn_logit": report["max_attn_logit"]}
    return report


def _inner_optimizers(optimizer) -> list:
    return [c.optimizer for c in getattr(optimizer, "chained_optimizers", [optimizer])]


def train(cfg: K2Config, data: Optional[Iterator[dict]] = None) -> list[dict]:
    """Train until `cfg.train.iters` (resuming from a checkpoint when there is one).

    Returns this rank's metrics rows; rank 0 also writes them to `<run.dir>/metrics.jsonl`.
    """
    from megatron.core import parallel_state as ps

    from k2mcore.config.loader import dump_yaml
    from k2mcore.model.build import build_model
    from k2mcore.parallel.groups import init_distributed

    from k2mcore import checkpoint as ckpt
    from .faults import SkipCounter, StopRequest, injected_nan_steps, optimizer_step
    from .metrics import MetricsLogger
    from .step import forward_backward, wrap_ddp

    # before anything slow, so an early SIGTERM is not lost
    stop = StopRequest(stop_file=os.path.join(cfg.run.dir, "STOP"))
    ckpt_root = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
    resume_from = cfg.checkpoint.load or ckpt.latest_checkpoint(ckpt_root)
    done = ckpt.saved_step(resume_from) if resume_from and not cfg.checkpoint.load else 0
    if done >= cfg.train.iters:  # before any process group: the run has nothing left to do
        if os.environ.get("RANK", "0") == "0":
            print(f"k2m-train: the run in {cfg.run.dir} is already complete (step {done} of "
                  f"train.iters={cfg.train.iters}); to go on, raise train.iters; to start "
                  f"another, --set run.dir=NEW_DIR", flush=True)
        return []
    summary = None
    if data is None:  # bad data stops here, before any process group, model or checkpoint
        from k2mcore.data import check_data

        summary = check_data(cfg)
    from k2mcore.config.validate import resolve_layout

    groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))), seed=cfg.train.seed)
    model = wrap_ddp(build_model(cfg), distributed_optimizer=cfg.parallel.distributed_optimizer)
    optimizer, scheduler = build_optimizer(cfg, model)
    checkpoints = ckpt.CheckpointManager(ckpt_root, cfg, groups)

    step, consumed = 0, 0
    weights_only = False
    if resume_from:
        load_start = time.perf_counter()
        # a weights-only checkpoint (k2m-convert hf-to-mcore) starts training at step 0
        weights_only = not ckpt.has_optimizer_state(resume_from)
        meta = checkpoints.load(resume_from, model, *(() if weights_only else (optimizer, scheduler)))
        load_s = time.perf_counter() - load_start
        step, consumed = int(meta["step"]), int(meta["consumed_samples"])

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if data is None:
        from k2mcore.data import build_data_iterator

        data = build_data_iterator(cfg, dp_rank=dp_rank, dp_size=dp_size,
                                   consumed_samples=consumed, summary=summary)
    t = cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(cfg.run.dir, "config.yaml"))
        p = cfg.parallel
        print(f"k2m-train: {cfg.model.name} on {dist.get_world_size()} ranks: TP{p.tp} "
              f"PP{p.pp}{f' VPP{p.vpp}' if p.vpp else ''} EP{p.ep} ETP{p.etp} DP{dp_size}, "
              f"{t.global_batch_size} x {t.seq_length} tokens per step, run dir {cfg.run.dir}",
              flush=True)
        if resume_from:
            what = "initialized weights from" if weights_only else "resumed from"
            print(f"{what} {meta['path']} at step {step} in {load_s:.2f} s", flush=True)
    logger = MetricsLogger(cfg, world_size=dist.get_world_size(), is_writer=rank0,
                           start_step=step)
    skips = SkipCounter(t.max_consecutive_skips)
    nan_steps = injected_nan_steps()
    first_step, rows, saved_step = step + 1, [], step

    def save() -> None:
        nonlocal saved_step
        if step != saved_step:
            checkpoints.save(step, model, optimizer, scheduler, consumed_samples=consumed)
            saved_step = step

    try:
        while step < t.iters:
            start = time.perf_counter()
            step += 1
            # megatron's non-distributed optimizers leave param.grad aliasing main_grad
            optimizer.zero_grad()
            loss = forward_backward(model, [next(data) for _ in range(n_micro)],
                                    seq_length=t.seq_length, micro_batch_size=t.micro_batch_size)
            if step in nan_steps:
                loss = float("nan")
            lr = optimizer.param_groups[0]["lr"]  # the rate this step applies
            ok, grad_norm = optimizer_step(optimizer, loss)
            if ok:
                scheduler.step(increment=1)
            consumed += t.global_batch_size
            skips.update(ok, step, loss, grad_norm)
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "skipped": int(not ok), "skipped_total": skips.total}
            if cfg.model.measure_max_attn_logit or cfg.qk_clip_active:
                row.update(attention_report(cfg, optimizer, model, stepped=ok))
            rows.append(logger.log(row, step_time=time.perf_counter() - start,
                                   first_step=first_step))
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                save()
            if stop.requested():
                if rank0:
                    print(f"stop signal: saving at step {step} and exiting", flush=True)
                save()
                break
    finally:
        logger.close()
    if rank0:
        saved = ckpt.step_dir(ckpt_root, saved_step)
        print(f"metrics: {logger.path}\ntensorboard: {os.path.join(cfg.run.dir, 'tensorboard')}"
              f"\ncheckpoint: {saved if os.path.isdir(saved) else 'none saved (see checkpoint.interval)'}",
              flush=True)
    return rows
