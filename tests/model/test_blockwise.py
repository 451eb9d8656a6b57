"""Blockwise latent attention (k2mcore.model.blockwise) against the plain computation written
out here: full K/V up-projected from the latent, one masked softmax."""
from __future__ import annotations

import math

import pytest
import torch

from k2mcore.model.blockwise import QueryChunk, blockwise_latent_attention
from k2mcore.parallel.context import query_chunks

B, HEADS, R, NOPE, ROPE, V = 2, 3, 10, 6, 4, 5
SCALE = 0.3


def _plain(query, latent, k_rope, weight, q_positions):
    """softmax(q k^T * scale, causal at the queries' global positions) v, and the per-head max
    logit, with K = [latent W_k, k_rope] and V = latent W_v for every key at once."""
    b, n, _, _ = query.shape
    kv = (latent @ weight.t()).view(b, latent.shape[1], n, NOPE + V).transpose(1, 2)
    k_nope, value = kv.split([NOPE, V], dim=-1)
    key = torch.cat([k_nope, k_rope.unsqueeze(1).expand(b, n, -1, ROPE)], dim=-1)
    logits = (query @ key.transpose(-1, -2)) * SCALE
    future = torch.arange(latent.shape[1])[None, :] > q_positions[:, None]
    logits = logits.masked_fill(future, -math.inf)
    return torch.softmax(logits, dim=-1) @ value, logits.amax(dim=(0, 2, 3))


def _inputs(seq: int, queries: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seq * 31 + queries)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return (make(B, HEADS, queries, NOPE + ROPE), make(B, seq, R), make(B, seq, ROPE),
            make(HEADS * (NOPE + V), R))


def _positions(chunks) -> torch.Tensor:
    rows = sorted(chunks, key=lambda c: c.local_start)
    return torch.cat([torch.arange(c.global_start, c.global_end) for c in rows])


# (sequence, cp, cp rank): the whole sequence on one rank, and each rank's two load-balanced
# chunks at CP2 and CP4
CASES = [(24, 1, 0), (24, 2, 0), (24, 2, 1), (32, 4, 0), (32, 4, 3)]


@pytest.mark.parametrize("seq,cp,rank", CASES)
@pytest.mark.parametrize("block", [4, 5, 7, 64])  # dividing the sequence, not, one block
def test_output_gradients_and_max_logit_match_the_plain_attention(seq, cp, rank, block):
    chunks = query_chunks(seq // cp, cp, rank)
    query, latent, k_rope, weight = _inputs(seq, seq // cp)
    probe: list = []
    out = blockwise_latent_attention(query, latent, k_rope, weight, chunks, v_head_dim=V,
                                     softmax_scale=SCALE, block_size=block, probe=probe)
    want, want_max = _plain(query, latent, k_rope, weight, _positions(chunks))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probe[0], want_max, rtol=1e-12, atol=1e-12)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = (query, latent, k_rope, weight)  # dQ, dLatent, dRope-key, dW_kv_up
    got = torch.autograd.grad(out, inputs, d_out)
    ref = torch.autograd.grad(want, inputs, d_out)
    for name, g, r in zip(("query", "latent", "k_rope", "weight"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=name)
    last = max(c.global_end for c in chunks)
    if last < seq:  # keys after the rank's last query get no gradient (CP ranks but the first)
        assert got[1][:, last:].abs().max() == 0


def test_gradcheck_across_blocks_and_chunks():
    """Finite differences through the online softmax's merging and the recomputed blocks."""
    chunks = query_chunks(6, 2, 1)  # global rows 3..5 and 6..8 of 12
    inputs = _inputs(12, 6)
    fn = lambda q, lat, kr, w: blockwise_latent_attention(  # noqa: E731
        q, lat, kr, w, chunks, v_head_dim=V, softmax_scale=SCALE, block_size=5)
    assert torch.autograd.gradcheck(fn, inputs)


def test_fp32_matches_the_plain_attention_in_fp32():
    chunks = query_chunks(16, 2, 0)
    inputs = _inputs(32, 16, torch.float32)
    out = blockwise_latent_attention(*inputs, chunks, v_head_dim=V, softmax_scale=SCALE,
                                     block_size=6)
    want, _ = _plain(*inputs, _positions(chunks))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_saves_the_latent_not_the_keys_and_values():
    """What autograd keeps for backward: the query, latent, rope key, weight, output and
    log-sum-exp; no block's K or V (they are recomputed)."""
    seq, block = 64, 8
    chunks = query_chunks(seq, 1, 0)
    query, latent, k_rope, weight = _inputs(seq, seq)
    saved: list = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        blockwise_latent_attention(query, latent, k_rope, weight, chunks, v_head_dim=V,
                                   softmax_scale=SCALE, block_size=block)
    assert sorted(map(tuple, saved)) == sorted([
        (B, HEADS, seq, NOPE + ROPE), (B, seq, R), (B, seq, ROPE), (HEADS * (NOPE + V), R),
        (B, HEADS, seq, V), (B, HEADS, seq)])


@pytest.mark.parametrize("block", [0, -3])
def test_block_size_must_be_positive(block):
    query, latent, k_rope, weight = _inputs(8, 8)
    with pytest.raises(ValueError, match="model.attention_block_size"):
        blockwise_latent_attention(query, latent, k_rope, weight, [QueryChunk(0, 8, 0)],
                                   v_head_dim=V, softmax_scale=SCALE, block_size=block)


def test_chunks_must_tile_the_queries():
    query, latent, k_rope, weight = _inputs(8, 8)
    with pytest.raises(ValueError, match="chunks"):
        blockwise_latent_attention(query, latent, k_rope, weight, [QueryChunk(0, 4, 0)],
                                   v_head_dim=V, softmax_scale=SCALE, block_size=4)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("block", [3, 4, 64])
def test_packed_documents_attend_only_within_themselves(rank, block):
    """Packed at CP2: documents of 8, 4 and 12 tokens (padded to multiples of 4), each rank
    holding two chunks of every document; against the plain attention with a causal mask
    restricted to each query's document."""
    from k2mcore.parallel.context import packed_query_chunks

    bounds = [0, 8, 12, 24]
    chunks = packed_query_chunks(bounds, 2, rank)
    query, latent, k_rope, weight = _inputs(24, 12)
    probe: list = []
    out = blockwise_latent_attention(query, latent, k_rope, weight, chunks, v_head_dim=V,
                                     softmax_scale=SCALE, block_size=block, probe=probe)
    # the plain reference: full K/V, every key outside the query's document masked too
    b, n = query.shape[:2]
    kv = (latent @ weight.t()).view(b, 24, n, NOPE + V).transpose(1, 2)
    k_nope, value = kv.split([NOPE, V], dim=-1)
    key = torch.cat([k_nope, k_rope.unsqueeze(1).expand(b, n, -1, ROPE)], dim=-1)
    q_pos = _positions(chunks)
    doc = torch.bucketize(torch.arange(24), torch.tensor(bounds[1:]), right=True)
    masked = (torch.arange(24)[None, :] > q_pos[:, None]) | (doc[None, :] != doc[q_pos][:, None])
    logits = ((query @ key.transpose(-1, -2)) * SCALE).masked_fill(masked, -math.inf)
    want = torch.softmax(logits, dim=-1) @ value
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probe[0], logits.amax(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    inputs = (query, latent, k_rope, weight)
    for g, r in zip(torch.autograd.grad(out, inputs, d_out),
                    torch.autograd.grad(want, inputs, d_out)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
