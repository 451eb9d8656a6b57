"""The policy objectives of reinforcement learning on rollouts: advantages, the GRPO, GSPO and
K1.5/K2 losses, and truncated importance sampling (TIS), as plain tensor functions.

Shapes: a rollout batch of B samples, response tokens padded to T. `logp` [B, T] is the policy's
log-probability of each response token (logits divided by the sampling temperature), `old_logp`
the same under the weights that produced the batch's first minibatch ("πold", detached),
`rollout_logp` the engine's at sampling time, `mask` [B, T] 1 on the tokens the policy generated
(0 on padding and on tool output an environment inserted). Notation: ρ = exp(logπθ − logπold).

Each loss returns (sum, count, stats): the trainer adds the sums and counts over micro-batches and
data-parallel ranks and divides once, megatron's per-token convention, so the loss does not depend
on how the batch is split. GRPO counts masked-in tokens; GSPO and K2 count samples.

- grpo (DAPO's clip-higher defaults 0.2 / 0.28): per token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A);
- gspo: the same with the sequence ratio s = exp(mean over the sample's tokens of logπθ − logπold)
  (defaults 3e-4 / 4e-4), per sample;
- k2: (r − r̄ − τ·log(πθ(y|x)/πold(y|x)))², the log ratio summed over the response, per sample
  (K1.5 / K2's objective; r̄ is the group's mean reward, no advantage normalisation).

TIS (when the rollouts carry the engine's logprobs): the policy-gradient term is weighted by
w = min(exp(logπold − logπrollout), cap), detached (per token for grpo; from the mean token log
ratio per sample for gspo and k2), as verl weights it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

ADVANTAGES = ("grpo", "grpo_no_std")
#: (clip_low, clip_high) when rl.clip_low / rl.clip_high are not set
DEFAULT_CLIP = {"grpo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}


def group_index(groups: Sequence) -> torch.Tensor:
    """int64 [B]: each sample's group as 0, 1, ... in order of first appearance. A group's
    samples must be contiguous and a group must hold two or more (one-line ValueError)."""
    ids: dict = {}
    out = []
    for i, g in enumerate(groups):
        if g not in ids:
            ids[g] = len(ids)
        elif out[-1] != ids[g]:
            raise ValueError(f"rollouts: group {g!r} is not contiguous (sample {i})")
        out.append(ids[g])
    sizes = torch.bincount(torch.tensor(out, dtype=torch.int64))
    if (sizes < 2).any():
        g = next(g for g, k in ids.items() if sizes[k] < 2)
        raise ValueError(f"rollouts: group {g!r} has one sample; advantages need two or more")
    return torch.tensor(out, dtype=torch.int64)


def _group_stats(rewards: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) of each sample's group, [B] each (torch.std's correction 1)."""
    n = int(index.max()) + 1
    count = torch.bincount(index, minlength=n).to(rewards.dtype)
    mean = torch.zeros(n, dtype=rewards.dtype).index_add_(0, index, rewards) / count
    dev = (rewards - mean[index]) ** 2
    var = torch.zeros(n, dtype=rewards.dtype).index_add_(0, index, dev) / (count - 1)
    return mean[index], var.sqrt()[index]


def truncation_rewards(rewards: torch.Tensor, truncated: Optional[torch.Tensor],
                       value: Optional[float]) -> torch.Tensor:
    """`rewards` with a truncated sample's replaced by `value` (rl.truncation_reward) when set."""
    if value is None or truncated is None:
        return rewards
    return torch.where(truncated.bool(), torch.full_like(rewards, float(value)), rewards)


def advantages(rewards: torch.Tensor, groups: Sequence, kind: str = "grpo",
               eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages [B]: grpo (r − group mean) / (group std + eps), grpo_no_std
    r − group mean."""
    if kind not in ADVANTAGES:
        raise ValueError(f"rl.advantage: {kind!r} is not one of {', '.join(ADVANTAGES)}")
    mean, std = _group_stats(rewards, group_index(groups))
    centred = rewards - mean
    return centred / (std + eps) if kind == "grpo" else centred


def uniform_groups(rewards: torch.Tensor, groups: Sequence) -> torch.Tensor:
    """bool [B]: the sample's group has all-equal rewards (no learning signal: dynamic sampling
    drops it, rl.drop_uniform_groups)."""
    index = group_index(groups)
    n = int(index.max()) + 1
    lo = torch.full((n,), float("inf"), dtype=rewards.dtype).scatter_reduce(
        0, index, rewards, "amin")
    hi = torch.full((n,), float("-inf"), dtype=rewards.dtype).scatter_reduce(
        0, index, rewards, "amax")
    return (lo == hi)[index]


SampleSum = Callable[[torch.Tensor], torch.Tensor]


def _token_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor,
                 sample_sum: SampleSum = _token_sum) -> torch.Tensor:
    """Per-sample mean over masked-in tokens [B] (0 for a sample with none). `sample_sum` adds
    a sample's tokens: over the last dimension, and over context-parallel ranks when each
    holds part of the sequence (k2mcore.rl.loss)."""
    return sample_sum(x * mask) / sample_sum(mask).clamp_min(1)


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                cap: float = 2.0, sequence: bool = False,
                sample_sum: SampleSum = _token_sum) -> torch.Tensor:
    """Detached TIS weights min(exp(logπold − logπrollout), cap): [B, T] per token, or [B] from
    the mean token log ratio (`sequence`)."""
    diff = (old_logp - rollout_logp).detach()
    if sequence:
        diff = _masked_mean(diff, mask, sample_sum)
    return torch.exp(diff).clamp(max=cap)


def _stats(ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor,
           tis: Optional[torch.Tensor]) -> dict:
    """Sums and counts (so they add over micro-batches): clipped tokens or samples, the ratio's
    sum and max, the TIS weights' sum."""
    m = mask.bool()
    out = {"count": float(m.sum()), "clipped": float((clipped & m).sum()),
           "ratio_sum": float(ratio.detach()[m].sum()),
           "ratio_max": float(ratio.detach()[m].max()) if m.any() else 0.0}
    if tis is not None:
        out["tis_sum"] = float(tis[m].sum()) if tis.dim() == m.dim() else float(tis.sum())
    return out


def _clipped_pg(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float):
    """(−min(ρA, clip(ρ)A), where the clipped branch is the smaller)."""
    unclipped = ratio * adv
    clip = ratio.clamp(1 - low, 1 + high) * adv
    return -torch.minimum(unclipped, clip), clip < unclipped


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
              tis: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float, dict]:
    """(sum over masked-in tokens of the clipped per-token loss, their count, stats); `adv` [B]
    (or [B, T], a sample's value on each of its tokens), `tis` [B, T] weights or None."""
    ratio = torch.exp(logp - old_logp.detach())
    adv = adv if adv.dim() == logp.dim() else adv[:, None]
    loss, clipped = _clipped_pg(ratio, adv, clip_low, clip_high)
    if tis is not None:
        loss = loss * tis
    stats = _stats(ratio, clipped, mask, tis)
    return (loss * mask).sum(), float(mask.sum()), stats


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip_low: float = 3e-4, clip_high: float = 4e-4,
              tis: Optional[torch.Tensor] = None,
              sample_sum: SampleSum = _token_sum) -> tuple[torch.Tensor, float, dict]:
    """(sum over samples of the clipped sequence-ratio loss, the samples with tokens, stats);
    `tis` [B] weights or None."""
    has = sample_sum(mask) > 0
    ratio = torch.exp(_masked_mean(logp - old_logp.detach(), mask, sample_sum))
    loss, clipped = _clipped_pg(ratio, adv, clip_low, clip_high)
    if tis is not None:
        loss = loss * tis
    stats = _stats(ratio, clipped, has, tis)
    return (loss * has).sum(), float(has.sum()), stats


def k2_loss(logp: torch.Tensor, old_logp: torch.Tensor, rewards: torch.Tensor,
            group_mean: torch.Tensor, mask: torch.Tensor, tau: float,
            tis: Optional[torch.Tensor] = None,
            sample_sum: SampleSum = _token_sum) -> tuple[torch.Tensor, float, dict]:
    """(sum over samples of (r − r̄ − τ·Σ log ratio)², the samples with tokens, stats)."""
    has = sample_sum(mask) > 0
    log_ratio = sample_sum((logp - old_logp.detach()) * mask)
    loss = (rewards - group_mean - tau * log_ratio) ** 2
    if tis is not None:
        loss = loss * tis
    stats = _stats(torch.exp(log_ratio), torch.zeros_like(has), has, tis)
    return (loss * has).sum(), float(has.sum()), stats


def group_means(rewards: torch.Tensor, groups: Sequence) -> torch.Tensor:
    """Each sample's group mean reward [B] (the K2 loss's r̄)."""
    return _group_stats(rewards, group_index(groups))[0]


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(πθ ‖ πref): exp(ref − logπθ) − (ref − logπθ) − 1 (≥ 0, zero
    where the two agree; Schulman's unbiased, low-variance estimator, as verl's "low_var_kl")."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1
