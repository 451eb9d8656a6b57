"""MLA core attention against a hand-written reference, and its per-head max-logit probe."""
from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from k2mcore.config.schema import K2Config, ModelConfig
from k2mcore.model.attention import MLACoreAttention
from k2mcore.model.config import mla_config
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout


@pytest.fixture(scope="module")
def config():
    init_distributed(resolve_layout(K2Config(), 1), seed=0)
    return mla_config(ModelConfig())


def _reference(q, k, v, scale):
    """softmax(q k^T * scale + causal) v, written out per head: [s, b, n, d] tensors."""
    s, b, n, _ = q.shape
    out = torch.empty(s, b, n, v.shape[-1])
    max_logit = torch.full((n,), -math.inf)
    for bi in range(b):
        for h in range(n):
            logits = (q[:, bi, h] @ k[:, bi, h].T) * scale
            logits = logits.masked_fill(torch.ones(s, s).triu(1).bool(), -math.inf)
            max_logit[h] = max(max_logit[h], logits.max())
            out[:, bi, h] = torch.softmax(logits, -1) @ v[:, bi, h]
    return out.reshape(s, b, -1), max_logit


@pytest.mark.parametrize("measure", [False, True])
def test_matches_reference_with_distinct_qk_and_v_dims(config, measure):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 2, 4, 24, generator=g)  # q/k head dim 24 (nope 16 + rope 8)
    v = torch.randn(10, 2, 4, 16, generator=g)  # v head dim 16
    scale = 0.37
    attn = MLACoreAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=scale,
                            k_channels=24, v_channels=16, measure_max_logit=measure)
    out = attn(q, k, v, None)
    want, want_max = _reference(q, k, v, scale)
    assert out.shape == (10, 2, 64)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    if measure:
        torch.testing.assert_close(attn.current_max_attn_logits, want_max)
    else:
        assert attn.current_max_attn_logits is None  # switched off: nothing measured


def test_max_logit_is_a_running_max_per_head(config):
    attn = MLACoreAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=1.0,
                            k_channels=8, v_channels=8, measure_max_logit=True)
    q = torch.zeros(4, 1, 2, 8)
    k = torch.zeros(4, 1, 2, 8)
    q[0, 0, 0, 0], k[0, 0, 0, 0] = 3.0, 5.0  # head 0 sees 15 at (0, 0)
    attn(q, k, torch.randn(4, 1, 2, 8), None)
    q2, k2 = torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 2, 8)
    q2[3, 0, 1, 1], k2[1, 0, 1, 1] = 2.0, 4.0  # head 1 sees 8, head 0 only 0 now
    attn(q2, k2, torch.randn(4, 1, 2, 8), None)
    torch.testing.assert_close(attn.current_max_attn_logits, torch.tensor([15.0, 8.0]))
    # the masked future never counts: key 3 is after query 0
    q3, k3 = torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 2, 8)
    q3[0, 0, 0, 0], k3[3, 0, 0, 0] = 10.0, 10.0
    attn.current_max_attn_logits = None
    attn(q3, k3, torch.randn(4, 1, 2, 8), None)
    torch.testing.assert_close(attn.current_max_attn_logits, torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize("measure", [False, True])
def test_packed_documents_attend_only_within_themselves(config, measure):
    """THD input ([t, n, d], megatron's PackedSeqParams): each document's output and max logit
    are those of the document alone, whatever precedes it in the pack."""
    from k2mcore.model.packing import packed_seq_params

    g = torch.Generator().manual_seed(1)
    lengths = [3, 9, 1, 6]
    t = sum(lengths)
    q, k = torch.randn(2, t, 4, 24, generator=g)
    v = torch.randn(t, 4, 16, generator=g)
    cu = torch.tensor([0, 3, 12, 13, 19])
    attn = MLACoreAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.37,
                            k_channels=24, v_channels=16, measure_max_logit=measure)
    out = attn(q, k, v, None, packed_seq_params=packed_seq_params(cu, t))
    assert out.shape == (t, 64)
    maxima = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want, want_max = _reference(q[a:b, None], k[a:b, None], v[a:b, None], 0.37)
        torch.testing.assert_close(out[a:b], want[:, 0], rtol=1e-5, atol=1e-6)
        maxima.append(want_max)
    if measure:
        torch.testing.assert_close(attn.current_max_attn_logits, torch.stack(maxima).amax(0))


def test_packed_input_it_cannot_honour_is_refused(config):
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = MLACoreAttention(config, 1, AttnMaskType.causal, "self", k_channels=8, v_channels=8)
    x = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="qkv_format: 'sbhd'"):
        attn(x, x, x, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    padded = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu)
    with pytest.raises(ValueError, match="cu_seqlens_q_padded"):
        attn(x, x, x, None, packed_seq_params=padded)
    short = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu[:2], cu_seqlens_kv=cu[:2])
    with pytest.raises(ValueError, match="does not cover the 6 packed tokens"):
        attn(x, x, x, None, packed_seq_params=short)
