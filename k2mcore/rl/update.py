"""The policy update on rollout batches: advantages, the old-logprob pass, one optimizer step per
minibatch (the trainer's loop calls `PolicyUpdate.forward_backward` once per step).

A rollout batch is `train.global_batch_size x rl.minibatches` consecutive rollouts of the file;
minibatch m of rollout batch k is global batch k·M + m, drawn by the pretraining sampler's rule
(k2mcore.data.batches.MicroBatchSampler), so step s of a run reads the same rollouts in every
layout and after every resume. Advantages (and K2's r − r̄) are computed over the whole rollout
batch on every rank, from the records; each micro-batch carries its samples' values on their
tokens. The old log-probabilities are the trainer's own, in its layout, before the first
minibatch's step.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import objectives
from .loss import STATS, PolicyLoss

STATE_DIR = "rl"  # in a checkpoint: this rollout batch's old log-probabilities, per DP rank


@dataclass
class RolloutBatch:
    """This DP rank's share of one rollout batch: micro-batches per minibatch (torch tensors:
    tokens, labels, loss_mask, position_ids [mbs, seq]; "sample" [mbs], the rollout's index in
    the file; "adv", "target" and, with engine logprobs, "rollout_logp" [mbs, seq]; "old_logp"
    once computed) and the batch's figures (reward mean, advantage std, groups dropped)."""

    index: int
    minibatches: list[list[dict]]
    figures: dict = field(default_factory=dict)

    def micro_batches(self) -> list[dict]:
        return [mb for mini in self.minibatches for mb in mini]


def rollout_values(rewards: np.ndarray, groups: np.ndarray, truncated: np.ndarray,
                   rl: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Per rollout of a batch: (advantage, r − r̄, kept) as float64 [R], bool [R], and the
    figures. `rl.truncation_reward` replaces truncated rewards first; with
    `rl.drop_uniform_groups`, groups of equal rewards are not kept (dynamic sampling)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    r = objectives.truncation_rewards(r, torch.as_tensor(truncated), rl.truncation_reward)
    ids = [int(g) for g in groups]
    adv = objectives.advantages(r, ids, rl.advantage) if rl.loss != "k2" else \
        torch.zeros_like(r)
    target = r - objectives.group_means(r, ids)
    kept = torch.ones_like(r, dtype=torch.bool)
    dropped = 0
    if rl.drop_uniform_groups:
        uniform = objectives.uniform_groups(r, ids)
        kept = ~uniform
        index = objectives.group_index(ids)
        dropped = int(torch.unique(index[uniform]).numel())
    signal = target if rl.loss == "k2" else adv
    live = signal[kept]
    figures = {"reward_mean": float(torch.as_tensor(rewards, dtype=torch.float64).mean()),
               "adv_std": float(live.std()) if live.numel() > 1 else 0.0,
               "dropped_groups": dropped}
    return adv, target, kept, figures


class RolloutSource:
    """Rollout batches of a rollout dataset (k2mcore.rl.rollouts.RolloutDataset, or anything
    with its `sample`, `rewards`, `groups`, `truncated` and `has_logprobs`) for one DP rank."""

    def __init__(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int,
                 minibatches: int, dp_rank: int, dp_size: int, first_batch: int = 0) -> None:
        self.dataset = dataset
        self.gbs, self.mbs, self.minibatches = global_batch_size, micro_batch_size, minibatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.first_batch = first_batch  # the rollout batch the dataset starts with (k2m-rl's
        # iteration: each brings its own rollouts)

    @property
    def size(self) -> int:
        """Rollouts per rollout batch."""
        return self.gbs * self.minibatches

    def rollout_batch(self, k: int, rl: Any) -> RolloutBatch:
        from k2mcore.data.batches import MicroBatchSampler

        lo = (k - self.first_batch) * self.size
        adv, target, kept, figures = rollout_values(
            self.dataset.rewards[lo:lo + self.size], self.dataset.groups[lo:lo + self.size],
            self.dataset.truncated[lo:lo + self.size], rl)
        per_step = self.gbs // (self.mbs * self.dp_size)
        minis = []
        for m in range(self.minibatches):
            sampler = MicroBatchSampler(total_samples=len(self.dataset),
                                        consumed_samples=lo + m * self.gbs,
                                        micro_batch_size=self.mbs, dp_rank=self.dp_rank,
                                        dp_size=self.dp_size)
            minis.append([self._micro_batch(sampler.indices(i), lo, adv, target, kept)
                          for i in range(per_step)])
        return RolloutBatch(k, minis, figures)

    def _micro_batch(self, indices: Sequence[int], lo: int, adv, target, kept) -> dict:
        rows = [self.dataset.sample(i) for i in indices]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        local = torch.tensor([i - lo for i in indices])
        batch["sample"] = torch.tensor(list(indices), dtype=torch.int64)
        ones = torch.ones_like(batch["loss_mask"])
        batch["adv"] = adv[local].float()[:, None] * ones
        batch["target"] = target[local].float()[:, None] * ones
        batch["loss_mask"] = batch["loss_mask"] * kept[local].float()[:, None]
        return batch


def policy_forward_backward(model: Sequence[torch.nn.Module], groups: Any,
                            micro_batches: Sequence[dict], loss: PolicyLoss, *,
                            seq_length: int, micro_batch_size: int,
                            forward_only: bool = False) -> tuple[float, dict]:
    """One minibatch: megatron's schedule with the policy loss (gradients in main_grad, divided
    by the global count: masked-in tokens for grpo, samples for gspo and k2). Returns the loss
    (sum / count over the global batch, 0 without a masked-in token) and its metrics, the
    same on every rank."""
    from k2mcore.training.step import reduce_reports, run_schedule

    reports = run_schedule(model, groups, micro_batches, seq_length=seq_length,
                           micro_batch_size=micro_batch_size, forward_only=forward_only,
                           objective=loss)
    totals = reduce_reports(groups, [r["rl loss"] for r in reports], 2)
    stats = dict(zip(STATS, reduce_reports(groups, [r["rl stats"] for r in reports],
                                           len(STATS)).tolist()))
    top = reduce_reports(groups, [r["rl ratio_max"] for r in reports], 1, dist.ReduceOp.MAX)
    units, tokens = max(stats["units"], 1.0), max(stats["tokens"], 1.0)
    metrics = {"clip_frac": stats["clipped"] / units, "ratio_mean": stats["ratio_sum"] / units,
               "ratio_max": float(top[0]), "entropy": stats["entropy_sum"] / tokens}
    if any("rollout_logp" in mb for mb in micro_batches):
        metrics["tis_mean"] = stats["tis_sum"] / units
    if loss.kl_coef:
        metrics["kl"] = stats["kl_sum"] / tokens
    # no masked-in token (every group uniform, dropped): no signal, zero gradients, a loss of 0
    # (not NaN, which the trainer would count as a failed step)
    loss_value = float(totals[0] / totals[1]) if totals[1] > 0 else 0.0
    return loss_value, metrics


def attach_old_logprobs(batch: RolloutBatch, model: Sequence[torch.nn.Module], groups: Any, *,
                        seq_length: int, micro_batch_size: int, temperature: float,
                        replay: Any = None, key: str = "old_logp") -> None:
    """The log-probabilities of every micro-batch of the rollout batch under `model` (the
    policy: old_logp; the frozen reference: ref_logp), computed by the trainer in its layout
    (k2mcore.rl.logprobs); `replay`: the policy's routing replay, in the mode it is in."""
    from .logprobs import logprobs

    micro = batch.micro_batches()
    values = logprobs(model, groups, micro, seq_length=seq_length,
                      micro_batch_size=micro_batch_size, temperature=temperature, replay=replay)
    for mb, logp in zip(micro, values):
        mb[key] = logp


def attach_scales(batch: RolloutBatch, groups: Any, loss: str) -> None:
    """Each minibatch's "scale": its units (masked-in tokens for grpo, rollouts with one for
    gspo and k2) over its masked-in tokens, over every DP rank, on every token; the loss adds
    its token means (KL, entropy) times it, so that they stay means under any normaliser."""
    for mini in batch.minibatches:
        local = torch.zeros(2, dtype=torch.float64)
        for mb in mini:
            mask = mb["loss_mask"]
            local += torch.tensor([float(mask.sum()), float((mask.sum(-1) > 0).sum())],
                                  dtype=torch.float64)
        if groups.layout.dp > 1:
            dist.all_reduce(local, group=groups.dp_group)
        tokens, samples = float(local[0]), float(local[1])
        scale = 1.0 if loss == "grpo" or not tokens else samples / tokens
        for mb in mini:
            mb["scale"] = torch.full_like(mb["loss_mask"], scale)


class PolicyUpdate:
    """What the training loop calls for data.format=rollouts: `forward_backward(model, step)`
    runs step `step` (1-based): at the first minibatch of a rollout batch it builds the batch and
    its old log-probabilities; then the minibatch's forward/backward. `state()` and `load()`
    carry an unfinished rollout batch's old log-probabilities through a checkpoint."""

    def __init__(self, cfg: Any, groups: Any, source: Optional[RolloutSource],
                 model: Optional[Sequence[torch.nn.Module]] = None,
                 reference: Optional[Sequence[torch.nn.Module]] = None) -> None:
        from .replay import RouteReplay

        self.cfg, self.groups, self.source = cfg, groups, source
        self.temperature = cfg.rl.temperature  # k2m-rl's schedule changes it per iteration
        self.reference = reference  # the frozen reference policy's chunks (rl.reference)
        self.replay = None
        if cfg.rl.routing_replay != "none":
            if model is None:
                raise ValueError("rl.routing_replay needs the policy model")
            self.replay = RouteReplay(model, groups, cfg.model.first_k_dense)
        self.loss = PolicyLoss.from_config(cfg.rl, groups, self.replay)
        self.batch: Optional[RolloutBatch] = None
        self._restored: Optional[dict] = None  # per-rollout rows, from a checkpoint

    def set_temperature(self, temperature: float) -> None:
        """The sampling temperature of the rollouts to come (old pass and loss alike)."""
        self.temperature = temperature
        self.loss = replace(self.loss, temperature=temperature)

    def _where(self, step: int) -> tuple[int, int]:
        m = self.cfg.rl.minibatches
        return (step - 1) // m, (step - 1) % m

    def forward_backward(self, model: Sequence[torch.nn.Module], step: int) -> tuple[float, dict]:
        t = self.cfg.train
        k, m = self._where(step)
        if self.batch is None or self.batch.index != k:
            self.batch = self._prepare(model, k)
        if self.replay is not None:
            self.replay.mode, self.replay.changed[:] = "replay", 0
        try:
            loss, metrics = policy_forward_backward(
                model, self.groups, self.batch.minibatches[m], self.loss,
                seq_length=t.seq_length, micro_batch_size=t.micro_batch_size)
        finally:
            if self.replay is not None:
                self.replay.mode = None
        if self.replay is not None:
            metrics["replay_changed"] = self.replay.changed_share(self.groups)
        return loss, {**self.batch.figures, **metrics}

    def _prepare(self, model: Sequence[torch.nn.Module], k: int) -> RolloutBatch:
        """Rollout batch k with its scales, reference and old log-probabilities and (R2) the
        old pass's routes; from the checkpoint resumed from when it holds them."""
        t, rl = self.cfg.train, self.cfg.rl
        batch = self.source.rollout_batch(k, rl)
        attach_scales(batch, self.groups, rl.loss)
        restored, self._restored = self._restored, None
        if restored is not None and restored["rollout_batch"] == k:
            for mb in batch.micro_batches():
                for key, rows in restored["rows"].items():
                    mb[key] = torch.stack([rows[int(i)] for i in mb["sample"]])
            return batch
        common = dict(seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                      temperature=self.temperature)
        if self.reference is not None:  # its own router: never the replayed routes
            attach_old_logprobs(batch, self.reference, self.groups, key="ref_logp", **common)
        if self.replay is not None:
            self.replay.mode = "replay" if rl.routing_replay == "rollout" else "record"
        try:
            attach_old_logprobs(batch, model, self.groups, replay=self.replay, **common)
        finally:
            if self.replay is not None:
                self.replay.mode = None
        if rl.routing_replay == "old":
            m = self.cfg.model
            micro = batch.micro_batches()
            routes = self.replay.recorded_routes(micro, m.num_layers - m.first_k_dense,
                                                 m.moe_topk)
            for mb, r in zip(micro, routes):
                mb["routes"] = r
        return batch

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, step: int) -> Optional["RolloutState"]:
        """What a checkpoint after `step` must hold: the rollout batch's old log-probabilities
        when its minibatches are not all done (None otherwise)."""
        k, m = self._where(step)
        if m == self.cfg.rl.minibatches - 1 or self.batch is None or self.batch.index != k:
            return None
        computed = (("ref_logp",) if self.reference is not None else ()) + (
            ("routes",) if self.cfg.rl.routing_replay == "old" else ())
        return RolloutState(self.batch, self.groups, computed)

    def load(self, path: str, meta: dict) -> None:
        """After a resume from `path`: the unfinished rollout batch's old log-probabilities."""
        saved = (meta.get("extra") or {}).get("rl")
        if not saved:
            return
        rows: dict = {}
        for f in sorted(glob.glob(os.path.join(path, STATE_DIR, "old_logprobs_dp*.pt"))):
            part = torch.load(f, weights_only=True)
            samples = part.pop("samples").tolist()
            for key, values in part.items():
                rows.setdefault(key, {}).update(zip(samples, values))
        self._restored = {"rollout_batch": int(saved["rollout_batch"]), "rows": rows}


class RolloutState:
    """The checkpoint's part of an unfinished rollout batch: each DP rank's first rank of its
    model replica writes `rl/old_logprobs_dp<r>.pt` (its rollouts' indices and old
    log-probabilities, every rank having them whole), so a resume in any layout finds every
    rollout's row."""

    def __init__(self, batch: RolloutBatch, groups: Any, computed: Sequence[str] = ()) -> None:
        self.batch, self.groups, self.computed = batch, groups, tuple(computed)
        self.meta = {"rl": {"rollout_batch": batch.index}}

    def write(self, directory: str) -> None:
        g = self.groups
        if g.tp_rank or g.cp_rank or g.pp_rank:
            return
        micro = self.batch.micro_batches()
        os.makedirs(os.path.join(directory, STATE_DIR), exist_ok=True)
        part = {"samples": torch.cat([mb["sample"] for mb in micro])}
        # what the rollout batch computed before its first step (the reference's, R2's routes)
        for key in ("old_logp", *self.computed):
            part[key] = torch.cat([mb[key] for mb in micro]).cpu()
        torch.save(part, os.path.join(directory, STATE_DIR, f"old_logprobs_dp{g.dp_rank}.pt"))


def build_policy_update(cfg: Any, groups: Any, summary: Any,
                        model: Sequence[torch.nn.Module]) -> PolicyUpdate:
    """The trainer's PolicyUpdate over cfg.data's rollouts (checked: `summary`) for `model`,
    with the frozen reference policy of rl.reference loaded beside it."""
    from .reference import build_reference
    from .rollouts import RolloutDataset

    t = cfg.train
    dataset = RolloutDataset(summary.prefixes[0], t.seq_length, pad_id=summary.tokenizer.pad)
    source = RolloutSource(dataset, global_batch_size=t.global_batch_size,
                           micro_batch_size=t.micro_batch_size, minibatches=cfg.rl.minibatches,
                           dp_rank=groups.dp_rank, dp_size=groups.layout.dp)
    reference = build_reference(cfg, groups, cfg.rl.reference) if cfg.rl.reference else None
    return PolicyUpdate(cfg, groups, source, model=model, reference=reference)
