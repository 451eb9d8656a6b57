"""The RL policy update in each layout (run by layout_worker.py inside the shared launches).

One rollout file of 16 rollouts (four groups of four, one with equal rewards, a tool span masked
out, engine logprobs for TIS), trained as two minibatches of 8 (AdamW, lr 3e-3, so that the
second minibatch's ratio is not 1 and clipping acts), with each loss (grpo, gspo, k2) from the
shared initial weights: losses and metrics per step, the second step's gradients, the weights
after it, the rollout batch's old log-probabilities (the layout's `k2mcore.rl.logprobs`). At 1
rank also the first minibatch in 1, 2 and 4 micro-batches (loss and gradients).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

RUNS = ("1rank", "tp2-sp", "pp2-vpp2", "ep2", "tp2-ep2", "dp2", "cp2")
LOSSES = ("grpo", "gspo", "k2")
# the losses beyond grpo where they meet the layout: the per-sample count over DP (gspo and
# k2 count alike), the sequence sums over CP ranks (both); the log-probabilities, which TP, PP
# and EP touch, are the same for every loss
LAYOUT_LOSSES = {"1rank": LOSSES, "dp2": LOSSES[:2], "cp2": LOSSES}
ROLLOUT_GLOBAL_BATCH, MINIBATCHES, GROUP, LR = 8, 2, 4, 3e-3


def rollouts(vocab: int, seq: int) -> list:
    """16 rollouts: prompts of 3-9 tokens, responses up to `seq` in all; group 1's rewards are
    equal (dropped); rollout 5 has a tool span (mask 0) and rollout 9 is truncated."""
    from k2mcore.rl.rollouts import Rollout

    g = torch.Generator().manual_seed(77)
    out = []
    for i in range(ROLLOUT_GLOBAL_BATCH * MINIBATCHES):
        p = 3 + i % 7
        n = int(torch.randint(4, seq + 1 - p, (1,), generator=g))
        reward = 0.5 if i // GROUP == 1 else float(torch.rand(1, generator=g) > 0.4) + 0.1 * (i % 3)
        mask = [1] * n
        if i == 5:
            mask[1:3] = [0, 0]
        # near the tiny model's log(1/1024), so the TIS weights spread around 1 (some capped)
        logp = (-6.93 + 0.6 * torch.randn(n, generator=g)).clamp(max=0).tolist()
        out.append(Rollout(prompt=torch.randint(0, vocab, (p,), generator=g).tolist(),
                           response=torch.randint(0, vocab, (n,), generator=g).tolist(),
                           reward=reward, group=f"q{i // GROUP}", logprobs=logp, mask=mask,
                           truncated=i == 9))
    return out


def _config(name: str, loss: str, seq: int):
    from layout_worker import layout_overrides

    from k2mcore.config.loader import load_config

    # grpo's clip range narrowed so that the second minibatch's ratios leave it
    extra = {"k2": ["rl.tau=0.5"], "grpo": ["rl.clip_low=0.002", "rl.clip_high=0.003"]}.get(
        loss, [])
    return load_config("k2-tiny", layout_overrides(name) + extra + [
        f"train.seq_length={seq}", "train.dtype=fp32", f"rl.loss={loss}",
        f"train.global_batch_size={ROLLOUT_GLOBAL_BATCH}", f"rl.minibatches={MINIBATCHES}",
        "rl.temperature=0.9", "rl.truncation_reward=-1.0", "data.format=rollouts",
        "data.blend=unused", "data.tokenizer=unused", "train.eval_interval=0", f"optimizer.lr={LR}",
        "optimizer.min_lr=0", "optimizer.decay_style=constant", "optimizer.warmup_iters=0",
        # Adam's eps well above fp32's noise on small gradients, which a 1e-8 would amplify to
        # a whole step of lr (g / |g|) and so make two layouts' weights differ after one step
        "optimizer.adam_eps=1e-3",
        "train.clip_grad=0",
        "model.moe_router_bias_update_rate=1e-3", "parallel.distributed_optimizer=false"])


def build(name: str, loss: str, init_path: str, seq: int, *extra: str):
    """(cfg, groups, model, optimizer) of the layout from the shared initial weights (`extra`:
    more overrides), DDP without ZeRO-1 so that every rank's main_grad is whole (the
    comparisons gather them)."""
    from k2mcore.config.loader import apply_override
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import Overlap, ddp_param_layout, wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.parallel.reshard import scatter_full

    cfg = _config(name, loss, seq)
    for item in extra:
        apply_override(cfg, item)
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    groups = init_distributed(layout, seed=1234)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    model = wrap_ddp(chunks, groups, distributed_optimizer=False, param_layout=param_layout,
                     overlap=Overlap.from_config(cfg))
    scatter_full(model, torch.load(init_path, weights_only=True))
    optimizer, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
    return cfg, groups, model, optimizer


def _one_loss(name: str, loss: str, init_path: str, seq: int) -> dict:
    from k2mcore.parallel.ddp import sync_params
    from k2mcore.parallel.reshard import gather_full
    from k2mcore.rl.rollouts import RolloutList
    from k2mcore.rl.update import PolicyUpdate, RolloutSource

    cfg, groups, model, optimizer = build(name, loss, init_path, seq)
    layout = groups.layout
    data = RolloutList(rollouts(cfg.model.vocab_size, seq), seq, pad_id=0)
    source = RolloutSource(data, global_batch_size=cfg.train.global_batch_size,
                           micro_batch_size=cfg.train.micro_batch_size,
                           minibatches=MINIBATCHES, dp_rank=groups.dp_rank,
                           dp_size=layout.dp)
    update = PolicyUpdate(cfg, groups, source)
    rows, grads = [], None
    for step in (1, 2):
        optimizer.zero_grad()
        value, metrics = update.forward_backward(model, step)
        if step == 2:
            grads = gather_full(model, swap=lambda p: p.main_grad)
        ok, _, _ = optimizer.step()
        rows.append({"loss": value, "ok": ok, **metrics})
        sync_params(model)
    mine = [(mb["sample"], mb["old_logp"]) for mb in update.batch.micro_batches()]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    old = {int(i): row for part in parts for s, logp in part for i, row in zip(s, logp)}
    out = {"rows": rows, "grads": grads, "weights": gather_full(model), "old_logp": old}
    if name in PACKED and loss == "grpo":
        out["packed_diff"] = _packed_diff(model, groups, seq)
    if name == "1rank" and loss == "grpo":
        out["split"] = _split(model, optimizer, update, cfg, init_path)
    return out


PACKED = ("1rank", "tp2-sp", "cp2")  # DP1 layouts: every rank runs every packed row
PACK_PAD = 4  # each rollout padded to a multiple of 2 x cp (CP2), positions going on


def _packed_diff(model, groups, seq: int) -> float:
    """k2mcore.rl.logprobs on the rollouts packed several to a row (position_ids restarting
    at each) against one rollout per padded row, same weights: the largest difference."""
    from k2mcore.rl.logprobs import logprobs

    data = rollouts(1024, seq)
    width = 2 * seq  # packed rows of two rows' length
    rows, cur, used = [], [], 0
    for i, r in enumerate(data):
        n = len(r.prompt) + len(r.response) - 1
        length = -(-n // PACK_PAD) * PACK_PAD
        if used + length > width:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += length
    rows.append(cur)
    micro, spans = [], []
    for row in rows:
        tokens = torch.zeros(1, width, dtype=torch.int64)
        labels = torch.zeros(1, width, dtype=torch.int64)
        pos = torch.zeros(1, width, dtype=torch.int64)
        at = 0
        for i in row:
            ids = torch.tensor(data[i].prompt + data[i].response)
            n = ids.numel() - 1
            length = -(-n // PACK_PAD) * PACK_PAD
            tokens[0, at:at + n], labels[0, at:at + n] = ids[:-1], ids[1:]
            pos[0, at:at + length] = torch.arange(length)
            spans.append((len(micro), i, at, n))
            at += length
        pos[0, at:] = torch.arange(width - at)
        micro.append({"tokens": tokens, "labels": labels, "loss_mask": torch.ones(1, width),
                      "position_ids": pos})
    got = logprobs(model, groups, micro, seq_length=width, micro_batch_size=1, temperature=0.9,
                   packed=True)
    padded = []
    for r in data:
        ids = torch.tensor(r.prompt + r.response)
        row = {"tokens": torch.zeros(1, seq, dtype=torch.int64),
               "labels": torch.zeros(1, seq, dtype=torch.int64), "loss_mask": torch.ones(1, seq)}
        row["tokens"][0, :ids.numel() - 1], row["labels"][0, :ids.numel() - 1] = ids[:-1], ids[1:]
        padded.append(row)
    want = logprobs(model, groups, padded, seq_length=seq, micro_batch_size=1, temperature=0.9)
    assert len(spans) == len(data) and len(micro) < len(data)
    return max((got[m][0, at:at + n] - want[i][0, :n]).abs().max().item()
               for m, i, at, n in spans)


def _split(model, optimizer, update, cfg, init_path: str) -> dict:
    """The first minibatch's loss and gradients from the initial weights, its 8 rollouts in 8,
    4 and 2 micro-batches (1, 2, 4 rollouts each)."""
    from k2mcore.parallel.reshard import gather_full, scatter_full
    from k2mcore.rl.update import attach_old_logprobs, policy_forward_backward

    out = {}
    routers = [m for c in model for m in c.modules() if hasattr(m, "local_tokens_per_expert")]
    for mbs in (1, 2, 4):
        # the initial weights and expert bias (each backward's finalize moves the bias)
        scatter_full(model, torch.load(init_path, weights_only=True))
        for r in routers:
            r.expert_bias.zero_()
        optimizer.zero_grad()  # megatron's optimizer aliases grad and main_grad after a step
        src = update.source
        src.mbs = mbs
        batch = src.rollout_batch(0, cfg.rl)
        attach_old_logprobs(batch, model, update.groups, seq_length=cfg.train.seq_length,
                            micro_batch_size=mbs, temperature=cfg.rl.temperature)
        # the old-logprob pass is no training forward: the routers counted no token
        out.setdefault("counted_by_old_pass", 0.0)
        out["counted_by_old_pass"] += float(sum(r.local_tokens_per_expert.sum() for r in routers))
        # the old policy a step away from the current one: ratios differ from 1
        for mb in batch.micro_batches():
            mb["old_logp"] = mb["old_logp"] - 0.3 * torch.sin(mb["tokens"].float())
        value, metrics = policy_forward_backward(
            model, update.groups, batch.minibatches[0], update.loss,
            seq_length=cfg.train.seq_length, micro_batch_size=mbs)
        out[mbs] = (value, metrics, gather_full(model, swap=lambda p: p.main_grad))
    return out


def measure(name: str, out: str, init_path: str, seq: int) -> None:
    losses = LAYOUT_LOSSES.get(name, LOSSES[:1])
    results = {loss: _one_loss(name, loss, init_path, seq) for loss in losses}
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out, f"{name}.rl.pt"))
