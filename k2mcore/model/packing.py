"""Packed sequences for the model: document boundaries (`cu_seqlens`, the THD convention) as
megatron's `PackedSeqParams`, which MLA hands to its rotary embedding and core attention alike.

With `PackedSeqParams(qkv_format="thd")` megatron-core 0.19.2's MLA lays its tensors out as
[t, heads, dim] (batch 1 squeezed), applies RoPE per document (`_apply_rotary_pos_emb_thd`:
positions restart at every `cu_seqlens` entry when the rotary table has `max_seqlen` rows, fewer
than the t packed tokens) and passes the same object to the core attention: TE's THD kernels on
GPU, k2mcore's MLACoreAttention on the local spec, both block-diagonal causal.
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, key: str = "cu_seqlens") -> list[int]:
    """The boundaries as a list; one-line ValueError unless they cover `total` tokens:
    1-D, starting at 0, strictly increasing, ending at `total`."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(f"{key}: expected a 1-D tensor of document boundaries")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{key}: expected integer boundaries, got {cu_seqlens.dtype}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{key}: {bounds} does not cover the batch's {total} tokens "
                         f"(start at 0, end at {total})")
    steps = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(steps) <= 0:
        i = next(i for i, d in enumerate(steps) if d <= 0)
        raise ValueError(f"{key}: not increasing at entry {i + 1} ({bounds[i]} -> "
                         f"{bounds[i + 1]}); every document needs at least one token")
    return bounds


def packed_seq_params(cu_seqlens: torch.Tensor, total: int) -> PackedSeqParams:
    """megatron's THD parameters for documents `cu_seqlens` (checked) over `total` tokens.

    `max_seqlen` is the longest document, not `total`: megatron's THD rope restarts positions
    per document only when its rotary table is shorter than the pack (with `total` rows it
    reads positions 0..t-1 straight through)."""
    bounds = check_cu_seqlens(cu_seqlens, total)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64 positions restarting at 0 at every document."""
    bounds = check_cu_seqlens(cu_seqlens, total)
    return torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Boundaries of the documents in flattened `position_ids` (each restarting at 0, the
    packed batch convention): int32 [docs + 1], the first at 0, the last at numel."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids: a packed batch starts every document (and the first "
                         "token) at position 0")
    end = torch.tensor([flat.numel()], dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)
