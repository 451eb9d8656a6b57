"""The RL objectives on the model's logits, in any layout: per-token log-probabilities and
entropy from vocab-parallel logits (TP), the policy loss as megatron's per-token loss triple
(sum, count, report), with sequence sums over context-parallel ranks.

The batch a loss function gets is this rank's part of a micro-batch (k2mcore.training.step): its
token fields [b, s_local] (labels, loss_mask, and the rollout fields "old_logp", "rollout_logp",
"adv" and "target", each sample's value repeated over its tokens so that megatron's CP split cuts
them with the tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import objectives

# a report's "rl stats" vector: sums, added over micro-batches and ranks
STATS = ("units", "clipped", "ratio_sum", "tis_sum", "entropy_sum", "tokens", "kl_sum")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                   tp_group: Any) -> torch.Tensor:
    """log p(label) [b, s] under softmax(logits / temperature); `logits` [b, s, v / tp] split
    over the vocabulary on the TP ranks (megatron's vocab-parallel cross-entropy, which
    differentiates through the split)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = logits.float() / temperature  # a new tensor: the cross-entropy works in place
    return -vocab_parallel_cross_entropy(scaled, labels, tp_group=tp_group)


def token_entropy(logits: torch.Tensor, temperature: float, tp_group: Any,
                  grad: bool = False) -> torch.Tensor:
    """Entropy [b, s] of softmax(logits / temperature) over the whole vocabulary, from the
    vocab-parallel shards: log Z + m − Σ e·z / Z with e = exp(z − m), each sum all-reduced over
    TP. `grad`: differentiable (m, the max, is a constant: the entropy does not depend on
    it)."""
    parallel = tp_group is not None and dist.get_world_size(tp_group) > 1
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        z = (logits if grad else logits.detach()).float() / temperature
        top = z.detach().max(-1).values
        if parallel:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
        e = torch.exp(z - top[..., None])
        sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
        if parallel:
            if grad:
                # megatron's TP reduction: backward is the identity, as every TP rank holds the
                # same loss and back-propagates it into its own shard of the vocabulary
                from megatron.core.tensor_parallel.mappings import (
                    reduce_from_tensor_model_parallel_region,
                )

                sums = reduce_from_tensor_model_parallel_region(sums, group=tp_group)
            else:
                dist.all_reduce(sums, group=tp_group)
        return sums[0].log() + top - sums[1] / sums[0]


def sample_sum(cp_group: Any):
    """Adds each sample's tokens [b, s_local] -> [b]; over the CP ranks too (autograd: the
    backward all-reduces the gradient, which is the same as the sum's on every rank)."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return lambda x: x.sum(-1)
    from torch.distributed.nn.functional import all_reduce

    return lambda x: all_reduce(x.sum(-1), group=cp_group)


class _Replaying:
    """The forward step's per-micro-batch hooks (k2mcore.training.step), handed to the policy's
    routing replay when it has one (`replay`: k2mcore.rl.replay.RouteReplay or None)."""

    replay: Any

    def begin(self, batch: dict, source: dict) -> None:
        if self.replay is not None:
            self.replay.begin(batch, source)

    def wrap(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.replay is None else self.replay.wrap(output)


@dataclass(frozen=True)
class PolicyLoss(_Replaying):
    """The `rl` section's loss, as megatron's loss function of one micro-batch:
    `loss(batch, logits)` -> (sum, count, {"rl loss": [sum, count], "rl stats": STATS,
    "rl ratio_max": [max]})."""

    loss: str
    temperature: float
    clip_low: float
    clip_high: float
    tau: Optional[float]
    tis_cap: float
    tp_group: Any
    cp_group: Any = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    replay: Any = None  # k2mcore.rl.replay.RouteReplay of the policy, or None

    @classmethod
    def from_config(cls, rl: Any, groups: Any, replay: Any = None) -> "PolicyLoss":
        low, high = objectives.DEFAULT_CLIP.get(rl.loss, (0.0, 0.0))
        cp = groups.cp_group if groups.layout.cp > 1 else None
        return cls(rl.loss, rl.temperature,
                   low if rl.clip_low is None else rl.clip_low,
                   high if rl.clip_high is None else rl.clip_high,
                   rl.tau, rl.tis_cap, groups.tp_group, cp, rl.kl_coef, rl.entropy_coef, replay)

    def __call__(self, batch: dict, logits: torch.Tensor):
        logp = token_logprobs(logits, batch["labels"], self.temperature, self.tp_group)
        entropy = token_entropy(logits, self.temperature, self.tp_group,
                                grad=self.entropy_coef > 0)
        mask = batch["loss_mask"].float()
        old = batch["old_logp"].float()
        rollout = batch.get("rollout_logp")
        token_level = self.loss == "grpo"
        adds = sample_sum(self.cp_group)
        tis = None
        if rollout is not None:
            tis = objectives.tis_weights(old, rollout.float(), mask, self.tis_cap,
                                         sequence=not token_level, sample_sum=adds)
        if self.loss == "grpo":
            total, count, st = objectives.grpo_loss(logp, old, batch["adv"].float(), mask,
                                                    self.clip_low, self.clip_high, tis)
            first = 1.0
        elif self.loss == "gspo":
            total, count, st = objectives.gspo_loss(logp, old, batch["adv"][:, 0].float(), mask,
                                                    self.clip_low, self.clip_high, tis, adds)
            first = 1.0 if self.cp_group is None or self.cp_group.rank() == 0 else 0.0
        else:
            target = batch["target"][:, 0].float()
            total, count, st = objectives.k2_loss(logp, old, target, torch.zeros_like(target),
                                                  mask, self.tau, tis, adds)
            first = 1.0 if self.cp_group is None or self.cp_group.rank() == 0 else 0.0
        # a sample-level loss is whole on every CP rank: CP rank 0 counts it, and the others'
        # gradients come through the all-reduce of the sequence sums
        total = total * first
        count = count * first
        # token means added to the loss whatever its normaliser: "scale" is the minibatch's
        # units (tokens or samples) over its masked-in tokens, so sum / count is their mean
        scale = batch["scale"].float() if "scale" in batch else torch.ones_like(mask)
        kl_sum = 0.0
        if self.kl_coef:
            kl = objectives.k3_kl(logp, batch["ref_logp"].float())
            total = total + self.kl_coef * (kl * mask * scale).sum()
            kl_sum = float((kl.detach() * mask).sum())
        if self.entropy_coef:  # a bonus: higher entropy lowers the loss
            total = total - self.entropy_coef * (entropy * mask * scale).sum()
        stats = torch.tensor([st["count"] * first, st["clipped"] * first, st["ratio_sum"] * first,
                              st.get("tis_sum", 0.0) * first, float((entropy.detach() * mask).sum()),
                              float(mask.sum()), kl_sum], dtype=torch.float64)
        report = {"rl loss": torch.stack([total.detach().double(),
                                          torch.tensor(count, dtype=torch.float64)]),
                  "rl stats": stats,
                  "rl ratio_max": torch.tensor([st["ratio_max"]], dtype=torch.float64)}
        return total, torch.tensor(int(round(count)), dtype=torch.int), report


@dataclass(frozen=True)
class RecordLogprobs(_Replaying):
    """Loss function of the log-probability pass: no loss; the report's "logp" is the
    micro-batch's [b, s] label log-probabilities, gathered over the CP ranks."""

    temperature: float
    tp_group: Any
    cp_group: Any = None
    replay: Any = None  # routing replay (R3) or recording (R2) of the policy, or None

    def __call__(self, batch: dict, logits: torch.Tensor):
        from k2mcore.parallel.context import gather_tokens

        logp = token_logprobs(logits, batch["labels"], self.temperature, self.tp_group)
        if self.cp_group is not None and dist.get_world_size(self.cp_group) > 1:
            # [b, s_local] -> [s_local, b, 1] (the gather's layout) -> [b, s] in sequence order
            whole = gather_tokens(logp.t().unsqueeze(-1).contiguous(), self.cp_group,
                                  batch.get("cp_bounds"))
            logp = whole.squeeze(-1).t()
        zero = logits.sum() * 0.0
        return zero, torch.tensor(0, dtype=torch.int), {"logp": logp.detach().float()}
