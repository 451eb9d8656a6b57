"""MuonClip's Muon update against torch.optim.Muon and an fp64 hand-written reference."""
from __future__ import annotations

import math

import pytest
import torch

from k2mcore.optim.muonclip.muon import MuonClip, muon_update
from k2mcore.optim.muonclip.newton_schulz import K2_COEFFS, newton_schulz, ns_flops

SHAPES = [(48, 16), (16, 48), (32, 32), (40, 24)]  # tall, wide, square, tall


def _grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _reference_run(w0, grads, lr, wd, mu=0.95):
    """The K2 report's sum-form Muon, written out in fp64: M = mu M + G; U = mu M + G; NS; scale."""
    a, b, c = K2_COEFFS
    w, m = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        m = mu * m + g
        x = mu * m + g
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        o = (x.T if tall else x) * 0.2 * math.sqrt(max(w.shape))
        w = w - lr * (o + wd * w)
    return w


def _run(opt_cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_fp64_reference_over_5_steps(shape):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape, 5, seed=2)
    got = _run(MuonClip, w0, grads, lr=0.02, weight_decay=0.1)
    want = _reference_run(w0, grads, lr=0.02, wd=0.1)
    diff = (got.double() - want).abs().max().item()
    assert diff < 2e-6, diff  # vs |w| ~ 1, moved ~0.1 per step


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_torch_optim_muon(shape, wd):
    """torch.optim.Muon always orthogonalizes in bf16: with ns_dtype=bf16 we match it to bf16
    rounding; the default fp32 path agrees to bf16 accuracy of the update."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grads = _grads(shape, 5, seed=4)
    kw = dict(lr=0.02, weight_decay=wd, momentum=0.95, nesterov=True)
    want = _run(torch.optim.Muon, w0, grads, adjust_lr_fn="match_rms_adamw", **kw)
    same_dtype = _run(MuonClip, w0, grads, ns_dtype=torch.bfloat16, **kw)
    fp32 = _run(MuonClip, w0, grads, **kw)
    lr_scaled = 0.02 * 0.2 * math.sqrt(max(shape))  # size of one step's update entries ~ this * O(1)
    d_bf16 = (same_dtype - want).abs().max().item()
    d_fp32 = (fp32 - want).abs().max().item()
    assert d_bf16 < 1e-6, d_bf16  # measured ~6e-8: same bf16 NS, fp32 rounding of the final add
    assert d_fp32 < 2e-2 * lr_scaled * 5, d_fp32
    # and the update really moved the weights by Muon-sized steps
    assert (want - w0).abs().max().item() > 0.5 * lr_scaled


def test_batched_experts_equal_per_matrix():
    E, p, q = 4, 24, 40
    w0 = torch.randn(E, p, q, generator=torch.Generator().manual_seed(5))
    grads = _grads((E, p, q), 3, seed=6)
    stacked = _run(MuonClip, w0, grads, lr=0.01, weight_decay=0.1)
    for e in range(E):
        one = _run(MuonClip, w0[e], [g[e] for g in grads], lr=0.01, weight_decay=0.1)
        torch.testing.assert_close(stacked[e], one, rtol=0, atol=1e-6)
    # the batched NS itself, tall batch too
    G = torch.randn(E, q, p)
    torch.testing.assert_close(newton_schulz(G), torch.stack([newton_schulz(G[e]) for e in range(E)]),
                               rtol=0, atol=1e-6)


def test_split_rows_orthogonalizes_blocks_separately():
    g = torch.randn(2 * 16, 40)
    buf_a, buf_b = torch.zeros_like(g), torch.zeros(16, 40)
    fused = muon_update(g, buf_a, split_rows=2)
    top = muon_update(g[:16], buf_b)
    torch.testing.assert_close(fused[:16], top, rtol=0, atol=1e-6)
    bottom = muon_update(g[16:], torch.zeros(16, 40))
    torch.testing.assert_close(fused[16:], bottom, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    s = torch.linalg.svdvals(newton_schulz(G).double())
    assert s.min() > 0.6 and s.max() < 1.3, (s.min(), s.max())
    # same singular vectors as G: NS is an odd matrix polynomial U p(S) V^T
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    X = newton_schulz(G).double()
    inner = U.T @ X @ Vh.T
    torch.testing.assert_close(inner, torch.diag(torch.diagonal(inner)), rtol=0, atol=1e-4)


def test_ns_flops_hand_count():
    # p=2, q=3, 1 step: X X^T: 2*2*3 mul-adds -> 24 FLOPs; A@A: 2*2*2 -> 16; B@X: 2*2*3 -> 24
    assert ns_flops(2, 3, steps=1) == 24 + 16 + 24 == 64
    assert ns_flops(3, 2, steps=1) == 64  # transposed first
    assert ns_flops(2, 3, steps=5) == 5 * 64


def _msg(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "kwargs, params, needle",
    [
        (dict(lr=-1.0), [torch.zeros(2, 2)], "lr must be"),
        (dict(lr=0.1, momentum=1.0), [torch.zeros(2, 2)], "momentum must be"),
        (dict(lr=0.1, momentum=-0.1), [torch.zeros(2, 2)], "momentum must be"),
        (dict(lr=0.1, weight_decay=-0.1), [torch.zeros(2, 2)], "weight_decay must be"),
        (dict(lr=0.1, coefficients="polar"), [torch.zeros(2, 2)], "unknown Newton-Schulz coefficient set 'polar'"),
        (dict(lr=0.1), [torch.zeros(4)], "got a parameter of shape (4,)"),
        (dict(lr=0.1, ns_steps=0), [torch.zeros(2, 2)], "ns_steps must be"),
    ],
)
def test_bad_inputs_one_line_errors(kwargs, params, needle):
    with pytest.raises(ValueError) as e:
        MuonClip([torch.nn.Parameter(p) for p in params], **kwargs)
    assert needle in _msg(e)


def test_bad_split_rows_and_ns_input():
    with pytest.raises(ValueError) as e:
        MuonClip([{"params": [torch.nn.Parameter(torch.zeros(5, 4))], "split_rows": 2}], lr=0.1)
    assert "split_rows=2" in _msg(e)
    with pytest.raises(ValueError) as e:
        newton_schulz(torch.zeros(4))
    assert "newton_schulz needs a matrix" in _msg(e)
    with pytest.raises(ValueError) as e:
        newton_schulz(torch.zeros(2, 2), coefficients="nope")
    assert "known: k2, muon" in _msg(e)
