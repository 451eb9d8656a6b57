"""Context parallelism: which tokens a CP rank holds, and the latent exchange of MLA over CP.

The split is megatron's load-balanced one (`megatron.core.utils.get_batch_on_this_cp_rank`): the
sequence in 2·cp equal chunks, rank r keeping chunks r and 2cp−1−r, so every rank does the same
causal-attention work. megatron's rotary embedding slices its table the same way
(`get_pos_emb_on_this_cp_rank`), so a rank rotates its tokens at their global positions.

In attention a rank needs every token's key up to its queries' positions. k2mcore's MLA
(k2mcore.model.mla) all-gathers the compressed latent and the rotated rope key (576 values per
token at K2's shapes) rather than the up-projected K and V, and `global_order` puts the gathered
tokens back in sequence order.

Packed sequences (THD) split per document: each document, padded with masked tokens to a multiple
of 2·cp (megatron's `cu_seqlens_padded` convention), in 2·cp chunks, rank r keeping chunks r and
2cp−1−r of every document, so that every rank does the same work on every document.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from k2mcore.model.blockwise import QueryChunk

#: the batch fields k2mcore's step splits over CP (sequence dimension 1)
# a micro-batch's per-token fields, which CP splits with the tokens (the rollout fields of
# k2mcore.rl carry per-sample values on every token for this reason)
SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "old_logp", "rollout_logp",
                   "adv", "target", "ref_logp", "scale", "routes")


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2·cp chunks rank `cp_rank` holds, in the order it holds them."""
    return cp_rank, 2 * cp - 1 - cp_rank


def query_chunks(local_tokens: int, cp: int, cp_rank: int) -> list[QueryChunk]:
    """This rank's `local_tokens` rows as chunks contiguous in the global sequence: the whole
    sequence at cp 1, else its two load-balanced chunks."""
    if cp == 1:
        return [QueryChunk(0, local_tokens, 0)]
    if local_tokens % 2:
        raise ValueError(f"context parallelism: {local_tokens} tokens on a CP rank do not make "
                         f"two equal chunks")
    c = local_tokens // 2
    return [QueryChunk(i * c, c, j * c) for i, j in enumerate(chunk_ids(cp, cp_rank))]


def global_order(local_tokens: int, cp: int) -> torch.Tensor:
    """Indices that reorder a CP all-gather (rank 0's tokens, then rank 1's, ...) into sequence
    order: int64 [cp * local_tokens]."""
    c = local_tokens // 2
    owner = {}
    for r in range(cp):
        for half, j in enumerate(chunk_ids(cp, r)):
            owner[j] = r * local_tokens + half * c
    return torch.cat([torch.arange(owner[j], owner[j] + c) for j in range(2 * cp)])


def packed_query_chunks(bounds: Sequence[int], cp: int, cp_rank: int) -> list[QueryChunk]:
    """A packed rank's rows as chunks: for each document [a, b) of the packed sequence (padded
    boundaries `bounds`, each length a multiple of 2·cp), its chunks r and 2cp−1−r, laid end
    to end locally, attending to keys from a."""
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        c = (b - a) // (2 * cp)
        for half, j in enumerate(chunk_ids(cp, cp_rank)):
            out.append(QueryChunk(a // cp + half * c, c, a + j * c, key_start=a))
    return out


def packed_local_indices(bounds: Sequence[int], cp: int, cp_rank: int) -> torch.Tensor:
    """Which tokens of the packed sequence a CP rank holds, in its order: per document, chunk r
    then chunk 2cp−1−r of that document (megatron's THD split, which it takes from TE's
    `thd_get_partitioned_indices`)."""
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if (b - a) % (2 * cp):
            raise ValueError(f"packed sequence: a document of {b - a} tokens (at {a}) is not a "
                             f"multiple of 2*cp={2 * cp}; pad documents for context parallelism")
        c = (b - a) // (2 * cp)
        parts += [torch.arange(a + j * c, a + (j + 1) * c) for j in chunk_ids(cp, cp_rank)]
    return torch.cat(parts)


def packed_global_order(bounds: Sequence[int], cp: int) -> torch.Tensor:
    """Indices that reorder a CP all-gather of packed ranks' tokens into the packed order."""
    local = bounds[-1] // cp
    where = torch.empty(bounds[-1], dtype=torch.int64)
    for r in range(cp):
        where[packed_local_indices(bounds, cp, r)] = torch.arange(r * local, (r + 1) * local)
    return where


def split_packed_batch(batch: dict, bounds: Sequence[int], cp_group: Any) -> dict:
    """This CP rank's part of a packed micro-batch (fields [1, t], documents at `bounds`)."""
    if cp_group is None or cp_group.size() == 1:
        return batch
    index = packed_local_indices(bounds, cp_group.size(), cp_group.rank())
    parts = {k: batch[k].index_select(1, index.to(batch[k].device))
             for k in SEQUENCE_FIELDS if batch.get(k) is not None}
    return {**batch, **parts}


def split_batch(batch: dict, cp_group: Any) -> dict:
    """This CP rank's part of a micro-batch ([mbs, s] fields): megatron's own split, so the
    tokens are the ones megatron's rotary embedding (and TE's CP attention) expect."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp_group is None or cp_group.size() == 1:
        return batch
    parts = {k: batch[k] for k in SEQUENCE_FIELDS if batch.get(k) is not None}
    return {**batch, **get_batch_on_this_cp_rank(parts, is_hybrid_cp=False, cp_group=cp_group)}


def gather_tokens(local: torch.Tensor, cp_group: Any,
                  bounds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[s_local, b, d] on every CP rank -> [cp * s_local, b, d], every token of the sequence in
    order (packed: `bounds`, the documents' padded boundaries). Autograd: the backward
    reduce-scatters (each rank's queries contribute to every token's gradient), megatron's
    sequence-parallel gather run over the CP group."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp = cp_group.size()
    if cp == 1:
        return local
    gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True,
                                                    group=cp_group)
    order = (global_order(local.shape[0], cp) if bounds is None
             else packed_global_order(bounds, cp))
    return gathered.index_select(0, order.to(local.device))
