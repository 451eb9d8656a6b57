"""Routing replay for MoE policies: R3 forces the experts the inference engine used (the
rollouts' `routes`), R2 the experts the old policy chose in the old-logprob pass.

k2mcore's own rather than megatron-core 0.19.2's `RouterReplay`, whose three assumptions do not
hold here:
- its registry of routers is class-global, so a second model in the process (the frozen
  reference policy) would receive the policy's targets; here each policy model owns a
  `RouteReplay` that only its own routers hold;
- it keeps one target per layer, while a pipeline keeps several micro-batches in flight (1F1B,
  interleaved stages); here the routes travel with the micro-batch (a batch field, split with
  the tokens by CP and sliced by SP like them) and are made current by the forward step;
- its backward replay pops a per-layer list, which recomputation in another order than the
  forwards would pop wrongly; here an identity on each model chunk's output makes the
  micro-batch's routes current again when its backward starts, so a recomputed router (full or
  selective recompute) replays the same experts as its forward did.

It plugs into megatron's own hook: a router's `router_replay` object, whose `get_replay_topk`
megatron's `topk_routing_with_score_function` calls instead of its top-k. The gate weights are
then gathered from the router's own scores at the replayed experts (megatron does the gather), so
the router still learns. Positions without a route (padding: id -1) keep the router's choice.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

MODES = ("none", "rollout", "old")


class _LayerReplay:
    """What megatron's router calls (its `router_replay` attribute), for one MoE layer."""

    def __init__(self, owner: "RouteReplay", moe_index: int) -> None:
        self.owner, self.moe_index = owner, moe_index
        self.layer_number: Optional[int] = None  # megatron sets it

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups=None, group_topk=None,
                        default_compute_topk: Callable = None):
        probs, chosen = default_compute_topk(scores, topk, num_groups, group_topk)
        return self.owner.route(self.moe_index, scores, probs, chosen)


class _Resume(torch.autograd.Function):
    """Identity on a chunk's output whose backward makes its micro-batch's routes current again
    (the backward of a chunk starts at its output, before any of its layers recompute)."""

    @staticmethod
    def forward(ctx, owner: "RouteReplay", routes: Any, source: Any,
                x: torch.Tensor) -> torch.Tensor:
        ctx.owner, ctx.routes, ctx.source = owner, routes, source
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.owner.current, ctx.owner.source = ctx.routes, ctx.source
        ctx.owner.recomputing = True  # routers called from here on recompute a forward
        return None, None, None, grad


class RouteReplay:
    """The routing replay of one policy model's chunks on this rank.

    `mode`: None (routers choose), "replay" (force the current micro-batch's routes) or
    "record" (keep what the routers chose, per micro-batch, for R2). The forward step calls
    `begin(batch)` before a micro-batch's forward and `wrap(output)` after it."""

    def __init__(self, model: Sequence[torch.nn.Module], groups: Any, first_k_dense: int) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.groups = groups
        self.mode: Optional[str] = None
        self.current: Optional[torch.Tensor] = None  # [s_local, b, L, k], this rank's tokens
        self.recording: Optional[dict] = None  # layer -> [t, k], of the micro-batch running
        self.source: Optional[dict] = None
        self.recomputing = False
        self.changed = torch.zeros(2, dtype=torch.float64)  # tokens changed, tokens replayed
        self.layers: list[int] = []
        for chunk in model:
            for m in chunk.modules():
                if isinstance(m, TopKRouter):
                    index = int(m.layer_number) - 1 - first_k_dense
                    m.router_replay = _LayerReplay(self, index)
                    self.layers.append(index)

    # -- the forward step's hooks --------------------------------------------------------
    def begin(self, batch: dict, source: dict) -> None:
        """Before a micro-batch's forward on a chunk (`batch`: this rank's part of `source`, the
        micro-batch as the schedule handed it). Replay: make its routes current, batch["routes"]
        [b, s_cp, L, k] -> this rank's tokens in the router's order [s, b, L, k] (SP: its slice
        of the sequence). Record: the routers write into source["recorded_routes"] (a pipeline
        stage's chunks add their layers)."""
        self.recomputing = False
        self.source = source  # the micro-batch whose forward runs (tests key their checks by it)
        if self.mode == "record":
            self.recording = source.setdefault("recorded_routes", {})
            return
        if self.mode != "replay":
            return
        routes = batch["routes"].transpose(0, 1)
        layout = self.groups.layout
        if layout.sp and layout.tp > 1:
            n = routes.shape[0] // layout.tp
            routes = routes[self.groups.tp_rank * n:(self.groups.tp_rank + 1) * n]
        self.current = routes.contiguous()

    def wrap(self, output: torch.Tensor) -> torch.Tensor:
        if self.mode != "replay" or not torch.is_grad_enabled():
            return output
        return _Resume.apply(self, self.current, self.source, output)

    # -- the routers' -------------------------------------------------------------------
    def route(self, layer: int, scores: torch.Tensor, probs: torch.Tensor,
              chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "record":
            self.recording[layer] = chosen.detach().clone()
            return probs, chosen
        if self.mode != "replay":
            return probs, chosen
        target = self.current[:, :, layer].reshape(-1, chosen.shape[1]).to(chosen.device)
        given = (target >= 0).all(-1, keepdim=True)
        top = torch.where(given, target.to(chosen.dtype), chosen)
        if self.recomputing:  # counted in the forward already
            return scores.gather(1, top), top
        with torch.no_grad():
            same = (torch.sort(top, -1).values == torch.sort(chosen, -1).values).all(-1)
            self.changed += torch.tensor([float((~same & given[:, 0]).sum()),
                                          float(given.sum())], dtype=torch.float64)
        return scores.gather(1, top), top

    # -- R2: the old pass's choices as routes in sequence order -------------------------------
    def recorded_routes(self, micro_batches: Sequence[dict], num_layers: int,
                        topk: int) -> list[torch.Tensor]:
        """The routes the record pass kept, per micro-batch, as [b, s, L, k] in sequence order
        on every rank: gathered over SP (TP ranks), CP and the pipeline stages' layers."""
        from k2mcore.parallel.context import gather_tokens

        out = []
        g, layout = self.groups, self.groups.layout
        for mb in micro_batches:
            rec = mb.pop("recorded_routes", {})
            b, s = mb["tokens"].shape
            full = torch.zeros(b, s, num_layers, topk, dtype=torch.int64)
            for layer, chosen in rec.items():
                t = chosen.reshape(-1, b, topk)  # [s_local(/tp), b, k]
                if layout.sp and layout.tp > 1:
                    parts = [torch.empty_like(t) for _ in range(layout.tp)]
                    dist.all_gather(parts, t.contiguous(), group=g.tp_group)
                    t = torch.cat(parts)
                if layout.cp > 1:
                    t = gather_tokens(t, g.cp_group)
                full[:, :, layer] = t.transpose(0, 1).cpu()
            if layout.pp > 1:  # each stage holds its own layers; the others add zeros
                dist.all_reduce(full, group=g.pp_group)
            out.append(full)
        return out

    def changed_share(self, groups: Any) -> float:
        """Share of the replayed tokens whose experts the replay changed (summed over the
        layers of every rank; TP ranks hold copies but for SP's slices), since the last call."""
        totals = self.changed.clone()
        if groups.tp_rank and not groups.layout.sp:
            totals.zero_()
        for group in (groups.pp_group, groups.tp_group, groups.dp_cp_group):
            dist.all_reduce(totals, group=group)
        self.changed.zero_()
        return float(totals[0] / totals[1]) if totals[1] else 0.0
