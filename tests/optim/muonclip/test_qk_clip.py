"""QK-Clip on a real 1-rank k2-tiny model: exactly the intended rows scale, and logits land on tau."""
from __future__ import annotations

import math

import pytest
import torch

from k2mcore.config.loader import load_config
from k2mcore.model.build import build_model
from k2mcore.optim.muonclip.qk_clip import (
    clip_qk_in_model,
    mla_attentions,
    mla_clip_row_scales,
    qk_clip_,
    scale_rows_,
)
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout

NOPE, ROPE, V = 16, 8, 16  # k2-tiny head dims


def _build():
    cfg = load_config("k2-tiny", ["model.measure_max_attn_logit=true"])
    chunks = build_model(cfg, init_distributed(resolve_layout(cfg, 1), seed=1))
    with torch.no_grad():  # init std 0.006 gives logits ~0.01: grow q and k so logits are O(10)
        for a in mla_attentions(chunks):
            a.linear_q_up_proj.weight.mul_(25.0)
            a.linear_kv_up_proj.weight.mul_(25.0)
    return chunks


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1024, (2, 32), generator=g), torch.arange(32).expand(2, 32)


@pytest.fixture
def model_and_inputs():
    """A fresh model, its forward run once; each attention's exact inputs are recorded."""
    chunks = _build()
    inputs = {}

    def record(module, args, kwargs):
        inputs[module] = (tuple(t.detach().clone() if torch.is_tensor(t) else t for t in args), dict(kwargs))

    attns = mla_attentions(chunks)
    hooks = [a.register_forward_pre_hook(record, with_kwargs=True) for a in attns]
    with torch.no_grad():
        chunks[0](*_tokens(), None)
    for h in hooks:
        h.remove()
    return chunks, attns, inputs


def _weights(a):
    return {n: p.detach().clone() for n, p in a.named_parameters()}


def _rerun_max(a, inputs):
    a.core_attention.current_max_attn_logits = None
    args, kwargs = inputs[a]
    with torch.no_grad():
        a(*args, **kwargs)
    out = a.core_attention.current_max_attn_logits.clone()
    a.core_attention.current_max_attn_logits = None
    return out


def test_clip_scales_exactly_the_intended_rows_and_lands_logits_on_tau(model_and_inputs):
    chunks, attns, inputs = model_and_inputs
    before_logits = {a: a.core_attention.current_max_attn_logits.clone() for a in attns}
    all_s = torch.cat(list(before_logits.values()))
    assert all_s.min() > 1.0  # O(10) logits, as arranged
    tau = float(all_s.median()) - 1e-3  # about half the heads above it, half below
    want_clipped = int((all_s > tau).sum())
    assert 0 < want_clipped < all_s.numel()
    before_w = {a: _weights(a) for a in attns}

    stats = clip_qk_in_model(chunks, tau)

    assert stats.clipped_heads == want_clipped
    assert stats.layer_max_logits == {a.layer_number: float(before_logits[a].max()) for a in attns}
    assert stats.max_attn_logit == pytest.approx(float(all_s.max()))
    for a in attns:
        assert a.core_attention.current_max_attn_logits is None  # reset for the next step
        S, w0, w1 = before_logits[a], before_w[a], _weights(a)
        n = S.numel()
        gamma = torch.where(S > tau, tau / S, torch.ones(n))
        q0 = w0["linear_q_up_proj.weight"].view(n, NOPE + ROPE, -1)
        q1 = w1["linear_q_up_proj.weight"].view(n, NOPE + ROPE, -1)
        kv0 = w0["linear_kv_up_proj.weight"].view(n, NOPE + V, -1)
        kv1 = w1["linear_kv_up_proj.weight"].view(n, NOPE + V, -1)
        for h in range(n):
            g = float(gamma[h])
            torch.testing.assert_close(q1[h, :NOPE], q0[h, :NOPE] * math.sqrt(g), rtol=1e-6, atol=0)
            torch.testing.assert_close(q1[h, NOPE:], q0[h, NOPE:] * g, rtol=1e-6, atol=0)
            torch.testing.assert_close(kv1[h, :NOPE], kv0[h, :NOPE] * math.sqrt(g), rtol=1e-6, atol=0)
            assert torch.equal(kv1[h, NOPE:], kv0[h, NOPE:])  # value rows untouched
            if g == 1.0:  # heads at or below tau: bit-identical
                assert torch.equal(q1[h], q0[h]) and torch.equal(kv1[h], kv0[h])
        for name in w0:  # shared rotary key (kv_down), q_down, output projection, norms
            if name not in ("linear_q_up_proj.weight", "linear_kv_up_proj.weight"):
                assert torch.equal(w0[name], w1[name]), name

        # same attention inputs again: every logit of head h scaled by gamma_h, so the new max is
        # tau for clipped heads and unchanged for the others
        new = _rerun_max(a, inputs)
        want = torch.where(S > tau, torch.full_like(S, tau), S)
        torch.testing.assert_close(new, want, rtol=2e-5, atol=0)
        assert (new[S > tau] <= tau * (1 + 2e-5)).all()


def test_nothing_above_threshold_changes_nothing(model_and_inputs):
    chunks, attns, _ = model_and_inputs
    tau = float(torch.cat([a.core_attention.current_max_attn_logits for a in attns]).max()) + 1.0
    before = {a: _weights(a) for a in attns}
    stats = clip_qk_in_model(chunks, tau)
    assert stats.clipped_heads == 0 and len(stats.layer_max_logits) == len(attns)
    for a in attns:
        assert all(torch.equal(before[a][n], p) for n, p in a.named_parameters())
        assert a.core_attention.current_max_attn_logits is None
    assert clip_qk_in_model(chunks, tau).layer_max_logits == {}  # nothing measured since


def test_master_copy_clipped_and_weight_follows_it():
    chunks = _build()
    a = mla_attentions(chunks)[0]
    w = a.linear_q_up_proj.weight
    kv = a.linear_kv_up_proj.weight
    w.main_param = (w.detach().clone() * 1.001).float()  # a master that differs from the weight
    kv.main_param = kv.detach().clone().float()
    m0, kv0 = w.main_param.clone(), kv.detach().clone()
    S = torch.tensor([20.0, 5.0, 40.0, 9.0])
    assert qk_clip_(a, S, threshold=10.0) == 2
    gamma = torch.tensor([0.5, 1.0, 0.25, 1.0])
    want = m0.view(4, NOPE + ROPE, -1).clone()
    want[:, :NOPE] *= gamma.sqrt()[:, None, None]
    want[:, NOPE:] *= gamma[:, None, None]
    torch.testing.assert_close(w.main_param, want.view_as(m0), rtol=1e-6, atol=0)
    assert torch.equal(w.detach(), w.main_param)  # model weight = its master copy
    want_kv = kv0.view(4, NOPE + V, -1).clone()
    want_kv[:, :NOPE] *= gamma.sqrt()[:, None, None]
    torch.testing.assert_close(kv.main_param, want_kv.view_as(kv0), rtol=1e-6, atol=0)
    # ZeRO-style flat shard of the master: refused here (needs the distributed optimizer's offsets)
    kv.main_param = kv.detach().clone().view(-1)[:10]
    kv.main_param_sharded = True
    with pytest.raises(NotImplementedError):
        qk_clip_(a, S, threshold=10.0)


def test_row_scales_and_flat_shard_scaling():
    q, kv, clipped = mla_clip_row_scales(torch.tensor([4.0, 1.0]), 2.0, qk_nope=2, qk_rope=1, v_dim=3)
    r = math.sqrt(0.5)
    torch.testing.assert_close(q, torch.tensor([r, r, 0.5, 1, 1, 1]))
    torch.testing.assert_close(kv, torch.tensor([r, r, 1, 1, 1, 1, 1, 1, 1, 1]))
    assert clipped.tolist() == [True, False]
    W = torch.randn(6, 4)
    full = W * q[:, None]
    shard = W.view(-1)[5:17].clone()  # cuts rows 1..4 at arbitrary points
    scale_rows_(shard, q, cols=4, flat_offset=5)
    torch.testing.assert_close(shard, full.view(-1)[5:17], rtol=0, atol=0)


def _one_line(excinfo, needle):
    msg = str(excinfo.value)
    assert "\n" not in msg and needle in msg, msg


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_bad_threshold(tau):
    with pytest.raises(ValueError) as e:
        mla_clip_row_scales(torch.ones(2), tau, qk_nope=2, qk_rope=1, v_dim=2)
    _one_line(e, "QK-Clip threshold must be > 0")
    with pytest.raises(ValueError) as e:
        clip_qk_in_model([], tau)
    _one_line(e, "QK-Clip threshold must be > 0")


def test_bad_max_logits_shape():
    a = mla_attentions(_build())[0]
    with pytest.raises(ValueError) as e:
        qk_clip_(a, torch.ones(3), threshold=1.0)
    _one_line(e, "must have shape (4,)")
    with pytest.raises(ValueError) as e:
        qk_clip_(a, torch.ones(4), threshold=0.0)
    _one_line(e, "threshold must be > 0")


def test_two_dp_ranks_clip_from_the_global_max():
    import json
    import os

    from harness.launching import launch

    out = launch(os.path.join(os.path.dirname(__file__), "qk_clip_worker.py"), [], 2, what="qk_clip 2 ranks",
                 timeout=300)
    (line,) = [line for line in out.splitlines() if line.startswith("RESULTS ")]
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 2
    assert any(r["local_differs"] for r in results)  # the ranks measured different maxima
    for r in results:
        assert r["stats"] == pytest.approx(r["want"])
        assert r["clipped"] == r["want_clipped"] > 0
        assert r["weights_equal"]  # same clip on every DP rank: replicas stay identical
