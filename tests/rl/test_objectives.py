"""k2mcore.rl.objectives against values computed by hand on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from k2mcore.rl import objectives as ob

REWARDS = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0])
GROUPS = ["a", "a", "a", 7, 7, 7, 7]


def test_grpo_advantages_by_hand():
    # group a: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # group 7: mean 11/4, deviations -3/4 x3 and 9/4: var (3 x 9/16 + 81/16) / 3 = 9/4, std 1.5
    s_a, s_7 = math.sqrt(1 / 3), 1.5
    want = torch.tensor([(2 / 3) / (s_a + 1e-6), (-1 / 3) / (s_a + 1e-6), (-1 / 3) / (s_a + 1e-6),
                         -0.75 / (s_7 + 1e-6), -0.75 / (s_7 + 1e-6), -0.75 / (s_7 + 1e-6),
                         2.25 / (s_7 + 1e-6)])
    torch.testing.assert_close(ob.advantages(REWARDS, GROUPS), want)
    # torch.std is the unbiased std the formula names
    assert torch.std(REWARDS[3:]).item() == pytest.approx(s_7)
    torch.testing.assert_close(ob.advantages(REWARDS, GROUPS, "grpo_no_std"),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, -0.75, -0.75, -0.75, 2.25]))
    torch.testing.assert_close(ob.group_means(REWARDS, GROUPS),
                               torch.tensor([1 / 3] * 3 + [2.75] * 4))


def test_uniform_groups_and_truncation():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert ob.uniform_groups(r, [0, 0, 1, 1]).tolist() == [True, True, False, False]
    got = ob.truncation_rewards(r, torch.tensor([False, True, False, True]), -1.0)
    assert got.tolist() == [1.0, -1.0, 0.0, -1.0]
    assert ob.truncation_rewards(r, torch.tensor([True] * 4), None) is r


@pytest.mark.parametrize("groups, message", [
    ([0, 0, 1], "group 1 has one sample"),
    ([0, 1, 0, 1], "group 0 is not contiguous"),
])
def test_bad_groups_are_one_line(groups, message):
    with pytest.raises(ValueError, match=message):
        ob.group_index(groups)
    with pytest.raises(ValueError, match="rl.advantage: 'ppo'"):
        ob.advantages(torch.zeros(2), [0, 0], "ppo")


def test_grpo_loss_clips_per_token_by_hand():
    # two samples of two tokens; sample 1's second token masked out
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.7], [0.5, 3.0]])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    total, count, stats = ob.grpo_loss(logp, old, adv, mask, 0.2, 0.28)
    # token (0,0): rho 1.5, A 1: min(1.5, 1.28) = 1.28 -> -1.28 (clipped)
    # token (0,1): rho 0.7, A 1: min(0.7, 0.8) = 0.7 -> -0.7
    # token (1,0): rho 0.5, A -2: min(-1.0, -1.6) = -1.6 -> 1.6 (clipped)
    assert total.item() == pytest.approx(-1.28 - 0.7 + 1.6)
    assert count == 3 and stats["clipped"] == 2 and stats["count"] == 3
    assert stats["ratio_sum"] == pytest.approx(2.7) and stats["ratio_max"] == pytest.approx(1.5)
    total.backward()
    # only the unclipped token passes a gradient: d(-rho A)/dlogp = -rho A = -0.7
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.7], [0.0, 0.0]]))


def test_tis_weights_per_token_and_per_sequence():
    old = torch.log(torch.tensor([[0.5, 0.4], [0.2, 0.9]]))
    roll = torch.log(torch.tensor([[0.25, 0.4], [0.8, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    w = ob.tis_weights(old, roll, mask, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0], [0.25, 1.0]]))  # 2 capped at 1.5
    ws = ob.tis_weights(old, roll, mask, cap=2.0, sequence=True)
    # sample 0: mean(log 2, 0) -> sqrt(2); sample 1: log(1/4) over its one token -> 0.25
    torch.testing.assert_close(ws, torch.tensor([math.sqrt(2), 0.25]))
    # weighted GRPO: each token's loss times its weight (old = logp: rho 1, loss -A)
    total, _, stats = ob.grpo_loss(old, old, torch.tensor([1.0, 1.0]), mask, tis=w)
    assert total.item() == pytest.approx(-(1.5 + 1.0 + 0.25))
    assert stats["tis_sum"] == pytest.approx(2.75)


def test_gspo_uses_the_sequence_ratio_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.3, -0.1, 5.0], [1e-4, 1e-4, 1e-4]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, 1.0])
    total, count, stats = ob.gspo_loss(logp, old, adv, mask, 3e-4, 4e-4)
    s0, s1 = math.exp(0.1), math.exp(1e-4)  # means over masked-in tokens
    # sample 0: min(2 s0, 2 (1 + 4e-4)) -> clipped; sample 1: s1 < 1 + 4e-4, unclipped
    assert total.item() == pytest.approx(-(2 * (1 + 4e-4)) - s1, rel=1e-6)
    assert count == 2 and stats["clipped"] == 1
    assert stats["ratio_max"] == pytest.approx(s0)


def test_k2_objective_by_hand():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.2], [-0.3, 0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards, mean = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    total, count, _ = ob.k2_loss(logp, old, rewards, mean, mask, tau=0.5)
    # sample 0: (0.5 - 0.5 * 0.3)^2 = 0.1225; sample 1: (-0.5 - 0.5 * -0.3)^2 = 0.1225
    assert total.item() == pytest.approx(0.245) and count == 2
    total.backward()
    # d/dlogp of (c - tau S)^2 = -2 tau (c - tau S) on the sample's masked-in tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.35, -0.35], [0.35, 0.0]]))


def test_k3_kl_by_hand():
    """exp(ref - logp) - (ref - logp) - 1: zero where the policies agree, d^2/2 for small d,
    and its gradient in logp is 1 - exp(ref - logp)."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.5, -1.5])
    kl = ob.k3_kl(logp, ref)
    want = [0.0, math.exp(0.5) - 0.5 - 1, math.exp(-1.0) + 1.0 - 1]
    assert kl.tolist() == pytest.approx(want, abs=1e-7)
    kl.sum().backward()
    assert logp.grad.tolist() == pytest.approx([1 - math.exp(d) for d in (0.0, 0.5, -1.0)],
                                              abs=1e-6)


def test_entropy_and_logprobs_of_logits_by_hand():
    """The loss's entropy and log-probabilities (one rank: no vocabulary split) of
    softmax(z / T) against the formulas, and the entropy's gradient against autograd's of the
    plain formula."""
    import torch.distributed as dist

    from harness.launching import free_port
    from k2mcore.rl.loss import token_entropy, token_logprobs

    z = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    t = 0.8
    p = torch.softmax(z.detach() / t, -1)
    h = token_entropy(z, t, None, grad=True)
    want = -(p * p.log()).sum(-1)
    torch.testing.assert_close(h.detach(), want)
    assert h[0, 1].item() == pytest.approx(math.log(4))  # uniform over 4 ids
    h.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    q = torch.log_softmax(z2 / t, -1)
    (-(q.exp() * q).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    labels = torch.tensor([[0, 3]])
    # megatron's vocab-parallel cross-entropy over a one-rank group
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    try:
        logp = token_logprobs(z.detach(), labels, t, dist.new_group([0], backend="gloo"))
    finally:
        if created:
            dist.destroy_process_group()
    torch.testing.assert_close(logp, p.log().gather(-1, labels[..., None])[..., 0])
