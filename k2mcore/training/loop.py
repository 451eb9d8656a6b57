"""The training loop, top to bottom: set-up, resume, step, finish.

Each step of set-up is one call into a component package (parallel, model, optim, data,
checkpoint); the loop itself only sequences them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from k2mcore import checkpoint as ckpt
from k2mcore.config.schema import K2Config
from k2mcore.parallel.layout import Layout

from .faults import Faults
from .stop import StopRequest


@dataclass
class _Run:
    """What set-up builds and the steps advance."""

    cfg: K2Config
    groups: Any  # k2mcore.parallel.groups.ProcessGroups
    model: list
    optimizer: Any
    scheduler: Any
    stepper: Any  # k2mcore.optim.skip.SkippingStep
    data: Iterator[dict]
    logger: Any  # .metrics.MetricsLogger
    checkpoints: Any  # k2mcore.checkpoint.CheckpointManager
    faults: Faults
    summary: Any = None  # k2mcore.data.DataSummary of cfg.data, once checked
    rl: Any = None  # k2mcore.rl.update.PolicyUpdate (data.format: rollouts)
    resumed: Optional[dict] = None  # the metadata of the checkpoint resumed from
    step: int = 0
    consumed: int = 0
    saved_step: int = 0


def train(cfg: K2Config, layout: Layout, data: Optional[Iterator[dict]] = None, *,
          faults: Optional[Faults] = None) -> list[dict]:
    """Train until `cfg.train.iters` on `layout` (from `resolve_layout`), resuming from a
    checkpoint when there is one. `data`: micro-batches to use instead of `cfg.data`'s;
    `faults`: a test's fault plan (k2mcore.training.faults).

    Returns this rank's metrics rows; rank 0 also writes them to `<run.dir>/metrics.jsonl`.
    """
    stop = StopRequest(stop_file=os.path.join(cfg.run.dir, "STOP"))  # before anything slow
    ckpt_root = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
    # the run's own newest checkpoint first, so that a preempted or requeued run started from
    # checkpoint.load (a converted release, another run's step) goes on from where it stopped;
    # checkpoint.load starts a run that has none yet (Megatron-LM's --pretrained-checkpoint)
    own = ckpt.latest_checkpoint(ckpt_root)
    resume_from = own or cfg.checkpoint.load
    if _already_complete(cfg, own):
        return []
    summary = None
    if data is None and cfg.data.format == "rollouts" and cfg.data.blend is None:
        from k2mcore.errors import ConfigError

        raise ConfigError("data.blend: k2m-train trains on rollout files (k2m-preprocess "
                          "--rollouts); k2m-rl generates its rollouts from rl.prompts")
    if data is None:  # bad data stops here, before any process group, model or checkpoint
        from k2mcore.data import check_data

        summary = check_data(cfg)
    run = set_up(cfg, layout, ckpt_root, faults or Faults())
    resume(run, resume_from)
    run.summary = summary
    if cfg.data.format == "rollouts":  # the policy update reads its rollout batches itself
        from k2mcore.rl.update import build_policy_update

        run.rl = build_policy_update(cfg, run.groups, summary or check_data(cfg), run.model)
        if run.resumed is not None:  # an unfinished rollout batch's old log-probabilities
            run.rl.load(run.resumed["path"], run.resumed)
    else:
        run.data = data if data is not None else _data(run, summary)
    rows = _steps(run, stop)
    _finish(run)
    return rows


def _already_complete(cfg: K2Config, own: Optional[str]) -> bool:
    """A finished run (its own newest checkpoint at train.iters) says so in one line, before any
    process group exists."""
    done = ckpt.saved_step(own) if own else 0
    if done < cfg.train.iters:
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"k2m-train: the run in {cfg.run.dir} is already complete (step {done} of "
              f"train.iters={cfg.train.iters}); to go on, raise train.iters; to start "
              f"another, --set run.dir=NEW_DIR", flush=True)
    return True


def set_up(cfg: K2Config, layout: Layout, ckpt_root: str, faults: Faults) -> _Run:
    """Process groups -> model -> DDP -> optimizer and scheduler."""
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.optim.skip import SkippingStep
    from k2mcore.parallel.ddp import Overlap, ddp_param_layout, wrap_ddp
    from k2mcore.parallel.groups import init_distributed

    groups = init_distributed(layout, seed=cfg.train.seed)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    model = wrap_ddp(chunks, groups, distributed_optimizer=cfg.parallel.distributed_optimizer,
                     param_layout=param_layout, overlap=Overlap.from_config(cfg))
    optimizer, scheduler = build_optimizer(cfg, model, groups, param_layout=param_layout)
    return _Run(cfg=cfg, groups=groups, model=model, optimizer=optimizer, scheduler=scheduler,
                stepper=SkippingStep(optimizer, cfg.train.max_consecutive_skips),
                data=iter(()), logger=None, faults=faults,
                checkpoints=ckpt.CheckpointManager(ckpt_root, cfg, groups))


def resume(run: _Run, resume_from: Optional[str], *, weights_only: bool = False,
           prog: str = "k2m-train") -> None:
    """Load the checkpoint to resume from (a weights-only one, from k2m-convert hf-to-mcore,
    starts training at step 0, as does any with `weights_only`); then the run's banner."""
    from k2mcore.config.loader import dump_yaml

    note = ""
    if resume_from:
        start = time.perf_counter()
        weights_only = weights_only or not ckpt.has_optimizer_state(resume_from)
        states = () if weights_only else (run.optimizer, run.scheduler)
        meta = run.checkpoints.load(resume_from, run.model, *states)
        run.resumed = meta
        if not weights_only:
            run.step, run.consumed = int(meta["step"]), int(meta["consumed_samples"])
        what = "initialized weights from" if weights_only else "resumed from"
        note = (f"\n{what} {meta['path']} at step {run.step} in "
                f"{time.perf_counter() - start:.2f} s")
    run.saved_step = run.step
    cfg, layout, t = run.cfg, run.groups.layout, run.cfg.train
    if run.groups.rank == 0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(cfg.run.dir, "config.yaml"))
        vpp = f" VPP{layout.vpp}" if layout.vpp else ""
        print(f"{prog}: {cfg.model.name} on {layout.world_size} ranks: TP{layout.tp} "
              f"PP{layout.pp}{vpp} EP{layout.ep} ETP{layout.etp} CP{layout.cp} DP{layout.dp}, "
              f"{t.global_batch_size} x {t.seq_length} tokens per step, run dir "
              f"{cfg.run.dir}{note}", flush=True)


def _data(run: _Run, summary: Any) -> Iterator[dict]:
    from k2mcore.data import build_data_iterator

    return build_data_iterator(run.cfg, dp_rank=run.groups.dp_rank, dp_size=run.groups.layout.dp,
                               consumed_samples=run.consumed, summary=summary)


def _steps(run: _Run, stop: StopRequest) -> list[dict]:
    """Step until train.iters or a stop request; save at the interval and on the request."""
    from .metrics import MetricsLogger

    cfg = run.cfg
    run.logger = MetricsLogger(cfg, world_size=run.groups.layout.world_size,
                               is_writer=run.groups.rank == 0, start_step=run.step)
    first_step, rows, stopped = run.step + 1, [], False
    try:
        while run.step < cfg.train.iters:
            rows.append(_step(run, first_step))
            run.checkpoints.poll()  # commits an async save every rank has finished writing
            if cfg.checkpoint.interval and run.step % cfg.checkpoint.interval == 0:
                _save(run, blocking=not cfg.checkpoint.async_save)
            if stop.requested():
                if run.groups.rank == 0:
                    print(f"stop signal: saving at step {run.step} and exiting", flush=True)
                stopped = True
                break
        # the last save is synchronous: an async one still being written is finished first
        run.checkpoints.wait()
        if stopped:
            _save(run)
            if run.groups.rank == 0 and stop.consume_file():
                print(f"removed {stop.stop_file}: the next start trains on", flush=True)
    finally:
        run.logger.close()
        run.checkpoints.close()  # the pruned checkpoints' deletion, if still under way
    return rows


def _step(run: _Run, first_step: int) -> dict:
    """One optimizer step over the global batch, evaluated at the interval; returns its metrics
    row, logged."""
    row, step_time = optimizer_step(run)
    t = run.cfg.train
    if t.eval_interval and (run.step % t.eval_interval == 0 or run.step == t.iters):
        row.update(_evaluate(run))
    return run.logger.log(row, step_time=step_time, first_step=first_step)


def optimizer_step(run: _Run) -> tuple[dict, float]:
    """Forward/backward over the global batch (or the RL update's minibatch), the optimizer's
    step; (the metrics row, seconds)."""
    from .metrics import attention_report
    from .step import forward_backward

    cfg, t = run.cfg, run.cfg.train
    start = time.perf_counter()
    run.step += 1
    run.optimizer.zero_grad()  # megatron's non-distributed optimizers alias grad and main_grad
    extra: dict = {}
    if run.rl is not None:  # a minibatch of the rollout batch (k2mcore.rl.update)
        loss, extra = run.rl.forward_backward(run.model, run.step)
    else:
        batches = [next(run.data) for _ in range(run.groups.layout.num_microbatches)]
        loss = forward_backward(run.model, run.groups, batches, seq_length=t.seq_length,
                                micro_batch_size=t.micro_batch_size, packed=cfg.data.packing)
    loss = run.faults.loss(run.step, loss)
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step applies
    ok, grad_norm = run.stepper.step(loss, run.step)
    if ok:
        run.scheduler.step(increment=1)  # a skipped step does not advance the schedule
    run.consumed += t.global_batch_size
    row = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
           "skipped": int(not ok), "skipped_total": run.stepper.total, **extra}
    if cfg.model.measure_max_attn_logit or cfg.qk_clip_active:
        row.update(attention_report(cfg, run.optimizer, run.model, run.groups, stepped=ok))
    return row, time.perf_counter() - start


def _evaluate(run: _Run) -> dict:
    """The validation loss (k2mcore.training.evaluate) on the valid split of cfg.data."""
    from k2mcore.data import build_data_iterator, check_data

    from .evaluate import evaluate

    cfg, g = run.cfg, run.groups
    if run.summary is None:
        run.summary = check_data(cfg)

    def batches():
        return build_data_iterator(cfg, dp_rank=g.dp_rank, dp_size=g.layout.dp,
                                   consumed_samples=0, split="valid", summary=run.summary)

    return evaluate(run.model, g, batches, eval_iters=cfg.train.eval_iters,
                    num_microbatches=g.layout.num_microbatches,
                    seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                    packed=cfg.data.packing)


def _save(run: _Run, blocking: bool = True) -> None:
    if run.step != run.saved_step:
        run.checkpoints.save(run.step, run.model, run.optimizer, run.scheduler,
                             consumed_samples=run.consumed, blocking=blocking,
                             extra=run.rl.state(run.step) if run.rl is not None else None)
        run.saved_step = run.step


def _finish(run: _Run) -> None:
    if run.groups.rank != 0:
        return
    saved = ckpt.step_dir(run.checkpoints.root, run.saved_step)
    where = saved if os.path.isdir(saved) else "none saved (see checkpoint.interval)"
    print(f"metrics: {run.logger.path}\ntensorboard: "
          f"{os.path.join(run.cfg.run.dir, 'tensorboard')}\ncheckpoint: {where}", flush=True)
