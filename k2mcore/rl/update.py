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
from dataclasses import dataclass, field
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
                 minibatches: int, dp_rank: int, dp_size: int) -> None:
        self.dataset = dataset
        self.gbs, self.mbs, self.minibatches = global_batch_size, micro_batch_size, minibatches
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def size(self) -> int:
        """Rollouts per rollout batch."""
        return self.gbs * self.minibatches

    def rollout_batch(self, k: int, rl: Any) -> RolloutBatch:
        from k2mcore.data.batches import MicroBatchSampler

        lo = k * self.size
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
    (sum / count over the global batch, NaN without a masked-in token) and its metrics, the
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
    loss_value = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    return loss_value, metrics


def attach_old_logprobs(batch: RolloutBatch, model: Sequence[torch.nn.Module], groups: Any, *,
                        seq_length: int, micro_batch_size: int, temperature: float) -> None:
    """The old-policy log-probabilities of every micro-batch of the rollout batch, computed by
    the trainer in its layout (k2mcore.rl.logprobs)."""
    from .logprobs import logprobs

    micro = batch.micro_batches()
    values = logprobs(model, groups, micro, seq_length=seq_length,
                      micro_batch_size=micro_batch_size, temperature=temperature)
    for mb, logp in zip(micro, values):
        mb["old_logp"] = logp


class PolicyUpdate:
    """What the training loop calls for data.format=rollouts: `forward_backward(model, step)`
    runs step `step` (1-based): at the first minibatch of a rollout batch it builds the batch and
    its old log-probabilities; then the minibatch's forward/backward. `state()` and `load()`
    carry an unfinished rollout batch's old log-probabilities through a checkpoint."""

    def __init__(self, cfg: Any, groups: Any, source: RolloutSource) -> None:
        self.cfg, self.groups, self.source = cfg, groups, source
        self.loss = PolicyLoss.from_config(cfg.rl, groups)
        self.batch: Optional[RolloutBatch] = None
        self._restored: Optional[dict] = None  # sample -> old logprobs, from a checkpoint

    def _where(self, step: int) -> tuple[int, int]:
        m = self.cfg.rl.minibatches
        return (step - 1) // m, (step - 1) % m

    def forward_backward(self, model: Sequence[torch.nn.Module], step: int) -> tuple[float, dict]:
        t = self.cfg.train
        k, m = self._where(step)
        if self.batch is None or self.batch.index != k:
            self.batch = self.source.rollout_batch(k, self.cfg.rl)
            if self._restored is not None and self._restored["rollout_batch"] == k:
                for mb in self.batch.micro_batches():
                    mb["old_logp"] = torch.stack([self._restored["logp"][int(i)]
                                                  for i in mb["sample"]])
            else:
                attach_old_logprobs(self.batch, model, self.groups, seq_length=t.seq_length,
                                    micro_batch_size=t.micro_batch_size,
                                    temperature=self.cfg.rl.temperature)
            self._restored = None
        loss, metrics = policy_forward_backward(model, self.groups, self.batch.minibatches[m],
                                                self.loss, seq_length=t.seq_length,
                                                micro_batch_size=t.micro_batch_size)
        return loss, {**self.batch.figures, **metrics}

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, step: int) -> Optional["RolloutState"]:
        """What a checkpoint after `step` must hold: the rollout batch's old log-probabilities
        when its minibatches are not all done (None otherwise)."""
        k, m = self._where(step)
        if m == self.cfg.rl.minibatches - 1 or self.batch is None or self.batch.index != k:
            return None
        return RolloutState(self.batch, self.groups)

    def load(self, path: str, meta: dict) -> None:
        """After a resume from `path`: the unfinished rollout batch's old log-probabilities."""
        saved = (meta.get("extra") or {}).get("rl")
        if not saved:
            return
        logp: dict = {}
        for f in sorted(glob.glob(os.path.join(path, STATE_DIR, "old_logprobs_dp*.pt"))):
            part = torch.load(f, weights_only=True)
            for i, row in zip(part["samples"].tolist(), part["logp"]):
                logp[i] = row
        self._restored = {"rollout_batch": int(saved["rollout_batch"]), "logp": logp}


class RolloutState:
    """The checkpoint's part of an unfinished rollout batch: each DP rank's first rank of its
    model replica writes `rl/old_logprobs_dp<r>.pt` (its rollouts' indices and old
    log-probabilities, every rank having them whole), so a resume in any layout finds every
    rollout's row."""

    def __init__(self, batch: RolloutBatch, groups: Any) -> None:
        self.batch, self.groups = batch, groups
        self.meta = {"rl": {"rollout_batch": batch.index}}

    def write(self, directory: str) -> None:
        g = self.groups
        if g.tp_rank or g.cp_rank or g.pp_rank:
            return
        micro = self.batch.micro_batches()
        os.makedirs(os.path.join(directory, STATE_DIR), exist_ok=True)
        part = {"samples": torch.cat([mb["sample"] for mb in micro]),
                "logp": torch.cat([mb["old_logp"] for mb in micro]).cpu()}
        torch.save(part, os.path.join(directory, STATE_DIR, f"old_logprobs_dp{g.dp_rank}.pt"))


def build_policy_update(cfg: Any, groups: Any, summary: Any) -> PolicyUpdate:
    """The trainer's PolicyUpdate over cfg.data's rollouts (checked: `summary`)."""
    from .rollouts import RolloutDataset

    t = cfg.train
    dataset = RolloutDataset(summary.prefixes[0], t.seq_length, pad_id=summary.tokenizer.pad)
    source = RolloutSource(dataset, global_batch_size=t.global_batch_size,
                           micro_batch_size=t.micro_batch_size, minibatches=cfg.rl.minibatches,
                           dp_rank=groups.dp_rank, dp_size=groups.layout.dp)
    return PolicyUpdate(cfg, groups, source)
