"""Routing replay, the KL to a reference policy and the entropy bonus in each layout (run by
layout_worker.py inside the shared launches; see test_replay.py).

- R3 (`rl.routing_replay: rollout`) with random engine routes that differ from the router's own,
  the rollouts' ref_logprobs with `rl.kl_coef` and `rl.entropy_coef`: two minibatches as in
  rl_probe (losses, metrics, second-step gradients, final weights); the routers' outputs (the
  dispatcher's inputs) checked against the routes in every replayed forward; at 1 rank the
  first minibatch's loss with the replay switched off.
- R2 (`old`) under full recompute: the experts of every forward and recomputed forward of the
  minibatches against those the old-logprob pass chose for the same micro-batch.
- A reference policy (rl.reference, a checkpoint of the initial weights) beside a policy
  replaying routes: its log-probabilities are the plain model's, the policy's are replayed.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

R3_RUNS = ("1rank", "tp2-sp", "pp2-vpp2", "ep2", "tp2-ep2", "cp2")
R2_RUNS = {"1rank": "full", "pp2-vpp2": "full", "tp2-sp": "selective", "cp2": "full"}
REFERENCE_RUNS = ("1rank", "ep2")
RUNS = tuple(dict.fromkeys((*R3_RUNS, *R2_RUNS, *REFERENCE_RUNS)))
KL_COEF, ENTROPY_COEF = 0.05, 0.01


def routed_rollouts(vocab: int, seq: int, num_experts: int, layers: int, topk: int) -> list:
    """rl_probe's rollouts with engine routes (random, so unlike the router's choices) and
    reference log-probabilities."""
    from rl_probe import rollouts

    g = torch.Generator().manual_seed(91)
    out = []
    for r in rollouts(vocab, seq):
        n = len(r.prompt) + len(r.response) - 1
        r.routes = [[torch.randperm(num_experts, generator=g)[:topk].tolist()
                     for _ in range(layers)] for _ in range(n)]
        r.ref_logprobs = (-6.93 + 0.4 * torch.randn(len(r.response), generator=g)).clamp(
            max=0).tolist()
        out.append(r)
    return out


class RouterWatch:
    """Forward hooks on this rank's routers: each replayed or recorded forward's routing map,
    checked against the routes (replay) or kept per micro-batch and layer (record) and compared
    later (R2)."""

    def __init__(self, model, replay) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.replay = replay
        self.mismatch = 0  # replayed tokens whose experts differ from their routes
        self.checked = 0
        self.recorded: dict = {}  # (samples, layer) -> routing map of the old pass
        self.r2_mismatch = 0
        self.r2_checked = 0
        self.recomputed = 0
        for chunk in model:
            for m in chunk.modules():
                if isinstance(m, TopKRouter):
                    m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, outputs) -> None:
        routing_map = outputs[1].detach()
        layer = module.router_replay.moe_index
        key = (tuple(self.replay.source["sample"].tolist()), layer)
        if self.replay.mode == "record":
            self.recorded[key] = routing_map.clone()
            return
        if self.replay.mode != "replay":
            return
        if key in self.recorded:  # R2: the old pass's experts for this micro-batch
            self.r2_checked += 1
            self.recomputed += int(self.replay.recomputing)
            self.r2_mismatch += int(not torch.equal(routing_map, self.recorded[key]))
            return
        target = self.replay.current[:, :, layer].reshape(routing_map.shape[0], -1)
        given = (target >= 0).all(-1)
        want = torch.zeros_like(routing_map).scatter(1, target.clamp(min=0), True)
        self.checked += int(given.sum())
        self.mismatch += int((routing_map[given] != want[given]).any(-1).sum())


def _build(name: str, init_path: str, seq: int, *extra: str):
    from rl_probe import build

    return build(name, "grpo", init_path, seq, *extra)


def _update(cfg, groups, model, seq: int, reference=None):
    from rl_probe import MINIBATCHES

    from k2mcore.rl.rollouts import RolloutList
    from k2mcore.rl.update import PolicyUpdate, RolloutSource

    m = cfg.model
    data = RolloutList(routed_rollouts(m.vocab_size, seq, m.num_experts,
                                       m.num_layers - m.first_k_dense, m.moe_topk),
                       seq, pad_id=0, num_experts=m.num_experts)
    source = RolloutSource(data, global_batch_size=cfg.train.global_batch_size,
                           micro_batch_size=cfg.train.micro_batch_size,
                           minibatches=MINIBATCHES, dp_rank=groups.dp_rank,
                           dp_size=groups.layout.dp)
    return PolicyUpdate(cfg, groups, source, model=model, reference=reference)


def _steps(update, model, optimizer, steps: int = 2):
    from k2mcore.parallel.ddp import sync_params
    from k2mcore.parallel.reshard import gather_full

    rows, grads = [], None
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        value, metrics = update.forward_backward(model, step)
        if step == steps:
            grads = gather_full(model, swap=lambda p: p.main_grad)
        ok, _, _ = optimizer.step()
        rows.append({"loss": value, "ok": ok, **metrics})
        sync_params(model)
    return rows, grads


def _sum(values) -> list:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _r3(name: str, init_path: str, seq: int) -> dict:
    from k2mcore.parallel.reshard import gather_full
    from k2mcore.rl.update import policy_forward_backward

    cfg, groups, model, optimizer = _build(
        name, init_path, seq, "rl.routing_replay=rollout", f"rl.kl_coef={KL_COEF}",
        f"rl.entropy_coef={ENTROPY_COEF}")
    update = _update(cfg, groups, model, seq)
    watch = RouterWatch(model, update.replay)
    rows, grads = _steps(update, model, optimizer)
    out = {"rows": rows, "grads": grads, "weights": gather_full(model),
           "watch": _sum([watch.mismatch, watch.checked])}
    if name == "1rank":  # the first minibatch from the initial weights, replay off and on
        from k2mcore.parallel.reshard import scatter_full

        scatter_full(model, torch.load(init_path, weights_only=True))
        batch = update._prepare(model, 0)  # the first rollout batch again, old pass replayed
        t = cfg.train
        losses = {}
        for mode in (None, "replay"):
            update.replay.mode = mode
            losses[mode or "none"] = policy_forward_backward(
                model, groups, batch.minibatches[0], update.loss, seq_length=t.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True)[0]
        update.replay.mode = None
        out["first_loss"] = losses
    return out


def _r2(name: str, init_path: str, seq: int, recompute: str) -> dict:
    cfg, groups, model, optimizer = _build(name, init_path, seq, "rl.routing_replay=old",
                                           f"train.recompute={recompute}")
    update = _update(cfg, groups, model, seq)
    watch = RouterWatch(model, update.replay)
    rows, _ = _steps(update, model, optimizer)
    return {"rows": rows, "watch": _sum([watch.r2_mismatch, watch.r2_checked, watch.recomputed,
                                         len(watch.recorded)])}


def _reference(name: str, init_path: str, seq: int, out_dir: str) -> dict:
    """A reference loaded from a checkpoint of the initial weights beside a replaying policy:
    the rollout batch's reference and old log-probabilities."""
    from k2mcore.checkpoint import CheckpointManager
    from k2mcore.rl.reference import build_reference

    cfg, groups, model, _ = _build(name, init_path, seq, "rl.routing_replay=rollout",
                                   f"rl.kl_coef={KL_COEF}")
    root = os.path.join(out_dir, f"reference-{name}")
    CheckpointManager(root, cfg, groups).save(0, model, None, None, consumed_samples=0)
    reference = build_reference(cfg, groups, root)
    update = _update(cfg, groups, model, seq, reference=reference)
    watch = RouterWatch(model, update.replay)
    batch = update._prepare(model, 0)
    mine = [(mb["sample"], mb["ref_logp"], mb["old_logp"]) for mb in batch.micro_batches()]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    ref, old = {}, {}
    for part in parts:
        for s, r, o in part:
            for i, a, b in zip(s.tolist(), r, o):
                ref[i], old[i] = a, b
    return {"ref_logp": ref, "old_logp": old, "watch": _sum([watch.mismatch, watch.checked])}


def measure(name: str, out: str, init_path: str, seq: int) -> None:
    results: dict = {}
    if name in R3_RUNS:
        results["r3"] = _r3(name, init_path, seq)
    if name in R2_RUNS:
        results["r2"] = _r2(name, init_path, seq, R2_RUNS[name])
    if name in REFERENCE_RUNS:
        results["reference"] = _reference(name, init_path, seq, out)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out, f"{name}.replay.pt"))
