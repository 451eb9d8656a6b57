"""QK-Clip for MLA (K2 report): rescale per-head query/key weights after the optimizer step.

For each local head h with S_max^h > tau: gamma_h = tau / S_max^h and
  - query no-RoPE rows (linear_q_up_proj, or linear_q_proj without q LoRA): x gamma^alpha
  - key no-RoPE rows (linear_kv_up_proj):                                   x gamma^(1-alpha)
  - query RoPE rows:                                                        x gamma
  - value rows of linear_kv_up_proj and the shared rotary key (linear_kv_down_proj): untouched
K2 uses alpha = 0.5. Both nope and rope parts of the logit q.k then scale by gamma, so the
clipped head's max logit becomes exactly tau. Row layout per head (megatron MLA):
q weight [n * (qk_nope + qk_rope), in], kv_up weight [n * (qk_nope + v), kv_lora_rank].
The row factors (`mla_clip_row_scales`) and `scale_rows_` (full tensor or a flat ZeRO shard with
its offset) are separate so a distributed optimizer can apply the same clip to its shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core.transformer.multi_latent_attention import MultiLatentAttention
from torch import Tensor, nn

from k2mcore import platform


def _check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise ValueError(f"QK-Clip threshold must be > 0, got {threshold!r}")


def mla_clip_row_scales(
    max_logits: Tensor, threshold: float, *, qk_nope: int, qk_rope: int, v_dim: int, alpha: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """(q row factors [n*(nope+rope)], kv_up row factors [n*(nope+v)], clipped-head mask [n]), fp32."""
    _check_threshold(threshold)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"QK-Clip alpha must be in [0, 1], got {alpha!r}")
    s = max_logits.detach().float()
    clipped = s > threshold
    gamma = torch.where(clipped, threshold / s, torch.ones_like(s))  # [n]; 1 for unclipped heads
    n = s.numel()
    q = torch.cat([gamma.pow(alpha)[:, None].expand(n, qk_nope), gamma[:, None].expand(n, qk_rope)], 1)
    kv = torch.cat([gamma.pow(1 - alpha)[:, None].expand(n, qk_nope), torch.ones(n, v_dim)], 1)
    return q.reshape(-1), kv.reshape(-1), clipped


@torch.no_grad()
def scale_rows_(t: Tensor, row_scale: Tensor, *, cols: Optional[int] = None, flat_offset: Optional[int] = None) -> None:
    """t[r, :] *= row_scale[r] in place, t full [rows, ...]; or, with flat_offset and cols, t is a
    1-D ZeRO shard W.view(-1)[flat_offset : flat_offset + t.numel()] of a [rows, cols] matrix W."""
    scale = row_scale.to(t.device, t.dtype)
    if flat_offset is None:
        t.mul_(scale.view(-1, *([1] * (t.ndim - 1))))
        return
    if cols is None or t.ndim != 1:
        raise ValueError("scale_rows_ on a flat shard needs a 1-D shard and the matrix's column count")
    t.mul_(scale[torch.arange(flat_offset, flat_offset + t.numel(), device=t.device) // cols])


def _weights(attention: MultiLatentAttention) -> tuple[nn.Parameter, nn.Module, nn.Parameter, nn.Module]:
    q_lin = attention.linear_q_up_proj if attention.config.q_lora_rank is not None else attention.linear_q_proj
    if not hasattr(attention, "linear_kv_up_proj"):
        raise ValueError("QK-Clip needs linear_kv_up_proj (absent when MLA latents are absorbed)")
    return q_lin.weight, q_lin, attention.linear_kv_up_proj.weight, attention.linear_kv_up_proj


@torch.no_grad()
def qk_clip_(attention: MultiLatentAttention, max_logits: Tensor, threshold: float, *, alpha: float = 0.5) -> int:
    """Clip one MLA attention's local heads from their max logits [local heads]; returns heads clipped.

    Scales the weight, its bias if any, and `weight.main_param` (megatron's fp32 master copy) when
    it is a full-shape tensor; a flat ZeRO shard (`main_param_sharded`) needs its offset: use
    mla_clip_row_scales + scale_rows_(flat_offset=...) from the distributed optimizer instead.
    """
    _check_threshold(threshold)
    n = attention.num_attention_heads_per_partition
    if max_logits.shape != (n,):
        raise ValueError(f"QK-Clip max_logits must have shape ({n},) (local heads), got {tuple(max_logits.shape)}")
    cfg = attention.config
    q_scale, kv_scale, clipped = mla_clip_row_scales(
        max_logits, threshold, qk_nope=cfg.qk_head_dim, qk_rope=cfg.qk_pos_emb_head_dim,
        v_dim=cfg.v_head_dim, alpha=alpha,
    )
    n_clipped = int(clipped.sum())
    if n_clipped == 0:
        return 0
    q_w, q_lin, kv_w, kv_lin = _weights(attention)
    for w, lin, scale in ((q_w, q_lin, q_scale), (kv_w, kv_lin, kv_scale)):
        if w.shape[0] != scale.numel():
            raise ValueError(f"QK-Clip expected {scale.numel()} rows in {tuple(w.shape)} weight")
        master = getattr(w, "main_param", None)
        if master is not None:
            if getattr(w, "main_param_sharded", False) or master.shape != w.shape:
                raise NotImplementedError("QK-Clip on sharded master weights needs the distributed optimizer's shard offsets")
            scale_rows_(master, scale)
            w.data.copy_(master)  # the model weight stays the rounding of its master copy
        else:
            scale_rows_(w.data, scale)
        bias = getattr(lin, "bias", None)
        if isinstance(bias, Tensor) and bias.numel() == w.shape[0]:
            scale_rows_(bias.data, scale)
    return n_clipped


def mla_attentions(chunks: Union[nn.Module, Iterable[nn.Module]]) -> list[MultiLatentAttention]:
    """Every MLA attention module in these model chunks, in module order."""
    chunks = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
    return [m for c in chunks for m in c.modules() if isinstance(m, MultiLatentAttention)]


@dataclass
class QKClipStats:
    layer_max_logits: dict[int, float] = field(default_factory=dict)  # layer_number -> max over heads
    clipped_heads: int = 0

    @property
    def max_attn_logit(self) -> Optional[float]:
        return max(self.layer_max_logits.values()) if self.layer_max_logits else None


def _measured(chunks) -> list[MultiLatentAttention]:
    return [a for a in mla_attentions(chunks)
            if getattr(a.core_attention, "current_max_attn_logits", None) is not None]


def _reduced_logits(layers: list[MultiLatentAttention], group: Optional[dist.ProcessGroup]) -> list[Tensor]:
    """Each layer's per-head max logits, MAX-reduced over `group` in one all_reduce."""
    logits = [a.core_attention.current_max_attn_logits.detach().float() for a in layers]
    if group is not None and dist.get_world_size(group) > 1 and logits:
        flat = torch.cat(logits)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
        logits = list(flat.split([t.numel() for t in logits]))
    return logits


@torch.no_grad()
def clip_qk_in_model(
    chunks: Union[nn.Module, Iterable[nn.Module]],
    threshold: float,
    *,
    alpha: float = 0.5,
    group: Optional[dist.ProcessGroup] = None,
) -> QKClipStats:
    """Clip every MLA layer from its core attention's `current_max_attn_logits`, then reset it.

    Layers with nothing measured (None) are skipped. With `group` of size > 1 (ranks that saw
    other tokens: DP x CP), the per-head maxima are MAX-reduced first, in one all_reduce; every
    rank of the group must hold the same measured layers.
    """
    _check_threshold(threshold)
    layers = _measured(chunks)
    stats = QKClipStats()
    for attention, s in zip(layers, _reduced_logits(layers, group)):
        stats.layer_max_logits[attention.layer_number] = float(s.max())
        stats.clipped_heads += qk_clip_(attention, s, threshold, alpha=alpha)
        attention.core_attention.current_max_attn_logits = None
    return stats


ShardLookup = Callable[[nn.Parameter], Optional[tuple[Tensor, int]]]


class ShardedQKClip:
    """QK-Clip on the fp32 master shards of a distributed optimizer, as its post-step hook.

    `shard_of(weight)` gives this rank's master shard of a model weight and its flat offset
    (None when the rank holds none of it). Rows are scaled on the shards only; the optimizer
    then copies masters to the model weights and all-gathers them, so both stay consistent.
    Probes are left for `attn_logit_report` to read and reset; `last_stats` holds this rank's
    layers (heads of its TP rank, maxima over `group`), clipped heads counted on every replica.
    """

    def __init__(self, chunks: Sequence[nn.Module], threshold: float, *, alpha: float = 0.5,
                 group: Optional[dist.ProcessGroup] = None, shard_of: ShardLookup) -> None:
        _check_threshold(threshold)
        self.chunks, self.threshold, self.alpha = list(chunks), float(threshold), alpha
        self.group, self.shard_of = group, shard_of
        self.last_stats: Optional[QKClipStats] = None

    @torch.no_grad()
    def __call__(self, _optimizer: Any = None) -> None:
        layers = _measured(self.chunks)
        stats = QKClipStats()
        for attention, s in zip(layers, _reduced_logits(layers, self.group)):
            stats.layer_max_logits[attention.layer_number] = float(s.max())
            cfg = attention.config
            q_scale, kv_scale, clipped = mla_clip_row_scales(
                s, self.threshold, qk_nope=cfg.qk_head_dim, qk_rope=cfg.qk_pos_emb_head_dim,
                v_dim=cfg.v_head_dim, alpha=self.alpha)
            stats.clipped_heads += int(clipped.sum())
            if not clipped.any():
                continue
            q_w, q_lin, kv_w, kv_lin = _weights(attention)
            for w, lin, scale in ((q_w, q_lin, q_scale), (kv_w, kv_lin, kv_scale)):
                if getattr(lin, "bias", None) is not None:
                    raise NotImplementedError("sharded QK-Clip: MLA projections with biases")
                found = self.shard_of(w)
                if found is not None:
                    shard, offset = found
                    scale_rows_(shard, scale, cols=w.shape[1], flat_offset=offset)
        self.last_stats = stats


def attn_logit_report(
    chunks: Union[nn.Module, Iterable[nn.Module]],
    num_layers: int,
    stats: Optional[QKClipStats] = None,
    *,
    count_clipped: bool = True,
) -> dict:
    """The step's attention-logit figures over all ranks, then the probes are reset.

    {'max_attn_logit': float, 'max_attn_logit_per_layer': [L floats, None where unmeasured],
    'clipped_heads': int}. Per-layer maxima come from `stats` (QK-Clip ran) or the probes.
    Collective over the world; `count_clipped` False on all but one rank of each group of
    replicas (DP x CP) so each clipped head counts once.
    """
    layers = mla_attentions(chunks)
    device = platform.device()
    per_layer = torch.full((num_layers,), float("-inf"), dtype=torch.float64, device=device)
    if stats is not None:
        for number, value in stats.layer_max_logits.items():
            per_layer[number - 1] = value
    else:
        for a in layers:
            probe = getattr(a.core_attention, "current_max_attn_logits", None)
            if probe is not None:
                per_layer[a.layer_number - 1] = float(probe.max())
    for a in layers:
        a.core_attention.current_max_attn_logits = None
    clipped = torch.tensor([float(stats.clipped_heads if stats and count_clipped else 0)],
                           dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(per_layer, op=dist.ReduceOp.MAX)
        dist.all_reduce(clipped)
    values = [float(v) if v > float("-inf") else None for v in per_layer.tolist()]
    measured = [v for v in values if v is not None]
    return {"max_attn_logit": max(measured) if measured else None,
            "max_attn_logit_per_layer": values, "clipped_heads": int(clipped.item())}
