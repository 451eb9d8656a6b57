"""Causal MLA attention computed block by block from the compressed latent.

MLA's keys and values are up-projections of a per-token latent (`kv_lora_rank` values, normed)
plus one rotary key shared by all heads (`qk_rope_head_dim`): together 576 values per token at
K2's shapes, against 64 heads x (192 + 128) = 20,480 for the up-projected K and V. This function
takes the latent of every key token and up-projects one block of keys at a time, merging the
blocks' partial results with an online softmax (running max and sum, log-sum-exp), as
FlashAttention does; queries are tiled by the same size, so one logits tile is [b, heads, block,
block]. The backward recomputes each block's K and V from the latent rather than storing them. So a rank holds the latent of the whole sequence and one block's K/V, never the
whole sequence's K/V: what makes context parallelism (k2mcore.parallel.context) save memory, and
lets one rank hold a sequence longer than its K/V would allow.

Queries come as chunks, each contiguous in the global sequence (context parallelism's two
load-balanced chunks per rank, or the whole sequence; with packed sequences, two per document); a
chunk's queries attend causally to the keys from its document's first token up to their own
position, so documents never see each other. Blocks wholly in a chunk's future are skipped, blocks
wholly in its past need no mask.

Why not torch's scaled_dot_product_attention per block: it does not return the log-sum-exp that
merging blocks needs (its flash kernels keep it internal), and per-block calls would still store
every block's K/V for backward. Written with plain matmuls, it runs on CPU, in fp32, for the
parity tests, and on GPUs without Transformer-Engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class QueryChunk:
    """`length` queries at local rows [local_start, local_start + length) and global positions
    [global_start, global_start + length), attending to the keys from `key_start` (their
    document's first token; 0 for one sequence per row) up to their own position."""

    local_start: int
    length: int
    global_start: int
    key_start: int = 0

    @property
    def global_end(self) -> int:
        return self.global_start + self.length


@dataclass(frozen=True)
class _Shapes:
    heads: int
    nope: int  # qk_head_dim: the up-projected part of q and k
    rope: int  # qk_pos_emb_head_dim
    v: int
    scale: float
    block: int
    acc: torch.dtype  # softmax statistics and accumulators: fp32, or fp64 for fp64 inputs


def _blocks(chunks: Sequence[QueryChunk], block: int) -> list[tuple[int, int, list[int]]]:
    """Key blocks (k0, k1, the chunks that attend to it): for each document (the chunks sharing
    a key_start), blocks from its first token to its chunks' last query."""
    out = []
    for start in sorted({c.key_start for c in chunks}):
        members = [i for i, c in enumerate(chunks) if c.key_start == start]
        end = max(chunks[i].global_end for i in members)
        for k0 in range(start, end, block):
            out.append((k0, min(k0 + block, end),
                        [i for i in members if k0 < chunks[i].global_end]))
    return out


def _keys(latent: torch.Tensor, weight: torch.Tensor, k0: int, k1: int, sh: _Shapes):
    """One block's up-projected keys and values: [b, n, kb, nope] and [b, n, kb, v]."""
    lat = latent[:, k0:k1]  # [b, kb, r]
    kv = torch.matmul(lat, weight.t())  # [b, kb, n * (nope + v)]
    kv = kv.view(lat.shape[0], k1 - k0, sh.heads, sh.nope + sh.v).transpose(1, 2)
    k_nope, value = kv.split([sh.nope, sh.v], dim=-1)
    return lat, k_nope, value


def _logits(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor,
            k_rope: torch.Tensor, chunk: QueryChunk, k0: int, k1: int,
            sh: _Shapes) -> torch.Tensor:
    """Scaled logits [b, n, L, kb] in fp32, future keys at -inf. `k_rope`: [b, kb, rope]."""
    s = torch.matmul(q_nope, k_nope.transpose(-1, -2))
    s = s + torch.matmul(q_rope, k_rope.transpose(-1, -2).unsqueeze(1))
    s = s.to(sh.acc) * sh.scale
    if k1 - 1 > chunk.global_start:  # some key lies after some query of the chunk
        q_pos = torch.arange(chunk.global_start, chunk.global_end, device=s.device)
        k_pos = torch.arange(k0, k1, device=s.device)
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return s


class _BlockwiseLatentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, latent, k_rope, weight, chunks, sh: _Shapes,
                probe: Optional[list]):
        b, n, s, _ = query.shape
        q_nope, q_rope = query.split([sh.nope, sh.rope], dim=-1)
        state = []
        for c in chunks:
            rows = slice(c.local_start, c.local_start + c.length)
            state.append({
                "q": (q_nope[:, :, rows], q_rope[:, :, rows]),
                "m": query.new_full((b, n, c.length), float("-inf"), dtype=sh.acc),
                "l": query.new_zeros((b, n, c.length), dtype=sh.acc),
                "acc": query.new_zeros((b, n, c.length, sh.v), dtype=sh.acc),
            })
        head_max = query.new_full((n,), float("-inf"), dtype=sh.acc)
        for k0, k1, members in _blocks(chunks, sh.block):
            _, k_nope, value = _keys(latent, weight, k0, k1, sh)
            kr = k_rope[:, k0:k1]
            for i in members:
                c, st = chunks[i], state[i]
                logits = _logits(*st["q"], k_nope, kr, c, k0, k1, sh)
                head_max = torch.maximum(head_max, logits.amax(dim=(0, 2, 3)))
                m_new = torch.maximum(st["m"], logits.amax(dim=-1))
                p = torch.exp(logits - m_new[..., None])
                corr = torch.exp(st["m"] - m_new)  # 0 on the first block (m = -inf)
                st["l"] = st["l"] * corr + p.sum(dim=-1)
                st["acc"] = st["acc"] * corr[..., None] + torch.matmul(p.to(value.dtype), value)
                st["m"] = m_new
        out = query.new_empty((b, n, s, sh.v))
        lse = query.new_empty((b, n, s), dtype=sh.acc)
        for c, st in zip(chunks, state):
            rows = slice(c.local_start, c.local_start + c.length)
            out[:, :, rows] = (st["acc"] / st["l"][..., None]).to(out.dtype)
            lse[:, :, rows] = st["m"] + torch.log(st["l"])
        if probe is not None:
            probe.append(head_max)
        ctx.save_for_backward(query, latent, k_rope, weight, out, lse)
        ctx.chunks, ctx.sh = chunks, sh
        return out

    @staticmethod
    def backward(ctx, d_out):
        query, latent, k_rope, weight, out, lse = ctx.saved_tensors
        chunks, sh = ctx.chunks, ctx.sh
        d_out = d_out.contiguous()
        q_nope, q_rope = query.split([sh.nope, sh.rope], dim=-1)
        # D = rowsum(dO * O): the softmax backward's correction term, per query
        delta = (d_out.to(sh.acc) * out.to(sh.acc)).sum(dim=-1)
        d_query = torch.zeros_like(query, dtype=sh.acc)
        d_latent = torch.zeros_like(latent, dtype=sh.acc)
        d_k_rope = torch.zeros_like(k_rope, dtype=sh.acc)
        d_weight = torch.zeros_like(weight, dtype=sh.acc)
        b, n = query.shape[:2]
        for k0, k1, members in _blocks(chunks, sh.block):
            lat, k_nope, value = _keys(latent, weight, k0, k1, sh)  # recomputed, not stored
            kr = k_rope[:, k0:k1]
            d_k_nope = torch.zeros_like(k_nope, dtype=sh.acc)
            d_value = torch.zeros_like(value, dtype=sh.acc)
            for i in members:
                c = chunks[i]
                rows = slice(c.local_start, c.local_start + c.length)
                qn, qr = q_nope[:, :, rows], q_rope[:, :, rows]
                logits = _logits(qn, qr, k_nope, kr, c, k0, k1, sh)
                p = torch.exp(logits - lse[:, :, rows, None])  # the forward's probabilities
                do = d_out[:, :, rows].to(sh.acc)
                d_value += torch.matmul(p.transpose(-1, -2), do)
                dp = torch.matmul(do, value.to(sh.acc).transpose(-1, -2))
                ds = p * (dp - delta[:, :, rows, None]) * sh.scale  # d logits (pre-scale)
                d_query[:, :, rows, : sh.nope] += torch.matmul(ds, k_nope.to(sh.acc))
                d_query[:, :, rows, sh.nope:] += torch.matmul(ds, kr.to(sh.acc).unsqueeze(1))
                ds_t = ds.transpose(-1, -2)
                d_k_nope += torch.matmul(ds_t, qn.to(sh.acc))
                d_k_rope[:, k0:k1] += torch.matmul(ds_t, qr.to(sh.acc)).sum(dim=1)
            # [b, n, kb, nope + v] -> [b, kb, n * (nope + v)]: the up-projection's output grad
            d_kv = torch.cat([d_k_nope, d_value], dim=-1).transpose(1, 2).reshape(
                b, k1 - k0, n * (sh.nope + sh.v))
            d_latent[:, k0:k1] += torch.matmul(d_kv, weight.to(sh.acc))
            d_weight += torch.matmul(d_kv.reshape(-1, d_kv.shape[-1]).t(),
                                     lat.to(sh.acc).reshape(-1, lat.shape[-1]))
        return (d_query.to(query.dtype), d_latent.to(latent.dtype), d_k_rope.to(k_rope.dtype),
                d_weight.to(weight.dtype), None, None, None)


def blockwise_latent_attention(
    query: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    kv_up_weight: torch.Tensor,
    chunks: Sequence[QueryChunk],
    *,
    v_head_dim: int,
    softmax_scale: float,
    block_size: int,
    probe: Optional[list] = None,
) -> torch.Tensor:
    """Causal attention of `query` over the keys the latent up-projects, block by block.

    query: [b, n, s, nope + rope], its rope part rotated at the queries' global positions;
    latent: [b, S, r], the normed compressed KV of all S key tokens in global order;
    k_rope: [b, S, rope], their rotated shared rope key;
    kv_up_weight: [n * (nope + v), r], the up projection of this rank's n heads (K's nope rows
    then V's, per head: megatron's linear_kv_up_proj);
    chunks: the query rows, their global positions and their documents' first keys.
    Returns [b, n, s, v]. `probe`, if given, gets the per-head max logit appended ([n], fp32,
    over unmasked logits): QK-Clip's measurement.
    """
    if block_size <= 0:
        raise ValueError(f"model.attention_block_size: {block_size}; must be > 0")
    n, d_qk = query.shape[1], query.shape[-1]
    rope = k_rope.shape[-1]
    nope = d_qk - rope
    if kv_up_weight.shape[0] != n * (nope + v_head_dim):
        raise ValueError(f"kv_up_weight: {tuple(kv_up_weight.shape)} rows, expected "
                         f"{n} heads x ({nope} + {v_head_dim})")
    covered = sorted((c.local_start, c.local_start + c.length) for c in chunks)
    if covered[0][0] != 0 or covered[-1][1] != query.shape[2] or any(
            a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ValueError(f"chunks: {covered} do not tile the {query.shape[2]} query rows")
    if max(c.global_end for c in chunks) > latent.shape[1]:
        raise ValueError("chunks: a query lies beyond the last key token")
    if any(not 0 <= c.key_start <= c.global_start for c in chunks):
        raise ValueError("chunks: a chunk's keys start after its first query")
    sh = _Shapes(heads=n, nope=nope, rope=rope, v=v_head_dim, scale=float(softmax_scale),
                 block=int(block_size), acc=torch.promote_types(query.dtype, torch.float32))
    return _BlockwiseLatentAttention.apply(query, latent, k_rope, kv_up_weight,
                                           _tiles(chunks, sh.block), sh, probe)


def _tiles(chunks: Sequence[QueryChunk], block: int) -> tuple[QueryChunk, ...]:
    """The chunks cut into query tiles of at most `block` rows (same document), so that a
    logits tile is [b, heads, block, block] whatever the chunk's length."""
    out = []
    for c in chunks:
        for off in range(0, c.length, block):
            out.append(QueryChunk(c.local_start + off, min(block, c.length - off),
                                  c.global_start + off, c.key_start))
    return tuple(out)

