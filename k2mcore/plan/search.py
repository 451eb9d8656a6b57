"""`k2m-plan --search`: every valid layout of N GPUs, the ones that fit, ranked by ideal step time.

Candidates vary tp (up to a node, dividing the heads), pp (with a balanced pipeline layout when
the layers do not split evenly), cp (1 to 16 with tp x cp within a node, from 8,192 tokens on),
vpp, ep, etp (1 or tp) and train.recompute; the batch sizes stay the config's. Each is first screened with closed-form state sizes (equal ZeRO-1
shards, no padding); the best are then planned exactly (`make_plan`) until `top` fit.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Optional

from k2mcore.config.schema import K2Config
from k2mcore.errors import ConfigError
from k2mcore.parallel.layout import Layout, resolve_layout
from k2mcore.parallel.param_counts import stage_parameters

from .activations import activation_bytes
from .comm import bus_bytes
from .planner import KINDS, Plan, PlanOptions, make_plan
from .state import param_dtype_bytes
from .timing import step_time

RECOMPUTE = ("none", "selective", "full")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def balanced_layout(num_layers: int, pp: int, vpp: int) -> str:
    """A megatron pipeline layout over pp*vpp stages: the embedding and the loss each count as
    one layer, the rest spread as evenly as possible (fewer on the first and last stages)."""
    stages = pp * vpp
    units = num_layers + 2
    base, extra = divmod(units, stages)
    counts = [base + (1 if 0 < i <= extra else 0) for i in range(stages)]
    if extra == stages - 1 or extra == stages:  # too many extras for the middle: give the ends
        counts = [base + (1 if i < extra else 0) for i in range(stages)]
    counts[0] -= 1
    counts[-1] -= 1
    parts = ["t" * max(c, 0) for c in counts]
    parts[0] = "E" + parts[0]
    parts[-1] += "L"
    return "|".join(parts)


#: context-parallel degrees --search tries, from train.seq_length tokens on (shorter sequences
#: keep cp 1: their attention is not what limits memory)
CP_DEGREES, CP_FROM_TOKENS = (1, 2, 4, 8, 16), 8192


def _cp_degrees(cfg: K2Config, ranks: int) -> list[int]:
    """CP degrees dividing the `ranks` left after TP and PP that split the sequence into
    2·cp equal chunks."""
    seq = cfg.train.seq_length
    if seq < CP_FROM_TOKENS:
        return [1]
    return [c for c in CP_DEGREES if ranks % c == 0 and seq % (2 * c) == 0]


def _model_splits(cfg: K2Config, world_size: int, gpus_per_node: int
                  ) -> Iterator[tuple[int, int, int]]:
    """(tp, pp, cp): tp within a node and dividing the heads, pp up to the layers, cp from
    _cp_degrees of what is left, tp x cp within a node (megatron puts CP ranks next to TP's)."""
    m = cfg.model
    for tp in [d for d in _divisors(world_size) if d <= gpus_per_node
               and m.num_attention_heads % d == 0]:
        for pp in [d for d in _divisors(world_size // tp) if d <= m.num_layers]:
            for cp in _cp_degrees(cfg, world_size // (tp * pp)):
                if tp * cp <= gpus_per_node:  # a layer's latent gather stays in the node
                    yield tp, pp, cp


def candidates(cfg: K2Config, world_size: int, gpus_per_node: int) -> Iterator[K2Config]:
    m = cfg.model
    for tp, pp, cp in _model_splits(cfg, world_size, gpus_per_node):
        for vpp in ([None] + [v for v in (2, 3, 4) if pp > 1 and pp * v <= m.num_layers]):
            for ep in [d for d in _divisors(m.num_experts) if world_size % (d * pp) == 0]:
                for etp in sorted({1, tp}):
                    if world_size % (etp * ep * pp):
                        continue
                    for recompute in RECOMPUTE:
                        c = copy.deepcopy(cfg)
                        p = c.parallel
                        p.tp, p.pp, p.ep, p.etp, p.cp = tp, pp, ep, etp, cp
                        p.sp = tp > 1
                        p.first_stage_layers = p.last_stage_layers = None
                        chunks = pp * (vpp or 1)
                        even = pp > 1 and m.num_layers % chunks == 0
                        p.vpp = vpp if even or pp == 1 else None
                        p.pipeline_layout = (None if even or pp == 1
                                             else balanced_layout(m.num_layers, pp, vpp or 1))
                        c.train.recompute = recompute
                        yield c


@dataclass
class Screened:
    cfg: K2Config
    layout: Layout
    peak_bytes: int
    step_s: float


def _quick(cfg: K2Config, layout: Layout, options: PlanOptions) -> tuple[int, dict]:
    """Closed-form heaviest-rank bytes and busiest-rank communication (bus bytes): equal ZeRO-1
    shards of unpadded buffers (k2mcore.plan.state lays them out exactly, for the plans kept)."""
    m = cfg.model
    pb = param_dtype_bytes(cfg, options.device)
    master = 4 if pb < 4 else 0
    per_el = master + (4 if cfg.optimizer.name == "muonclip" else 8)
    zero1 = cfg.parallel.distributed_optimizer
    expert = 3 * m.moe_ffn_hidden_size * m.hidden_size * (m.num_experts // layout.ep) // layout.etp
    acts = activation_bytes(cfg, layout, attention=options.attention, dtype_bytes=pb)
    dense_dp, edp = layout.dp * layout.cp, layout.expert_dp
    peak, comm = 0, {}
    for r, n in enumerate(stage_parameters(cfg, layout)):
        moe_layers = sum(1 for v in range(len(layout.stages[r])) for i in layout.layer_ids(r, v)
                         if i >= m.first_k_dense)
        e = moe_layers * expert if layout.ep > 1 else 0
        d = n - e
        shard = (d // dense_dp + e // edp) if zero1 else n
        peak = max(peak, n * (pb + 4) + per_el * shard + acts[r].total)
        buffers = [(d, d // dense_dp if zero1 else 0, dense_dp)]
        if e:
            buffers.append((e, e // edp if zero1 else 0, edp))
        c = bus_bytes(cfg, layout, rank={"pp": r}, dp_buffers=buffers, dtype_bytes=pb)
        if sum(c.values()) > sum(comm.values()):
            comm = c
    return peak, comm


def search(cfg: K2Config, world_size: int, options: PlanOptions, *, top: int = 10,
           screen: Optional[int] = None) -> tuple[list[Plan], int, int]:
    """(the `top` fitting plans by step time, layouts considered, layouts screened as fitting)."""
    screened, considered = [], 0
    for c in candidates(cfg, world_size, options.links.gpus_per_node):
        try:
            layout = resolve_layout(c, world_size)
        except ConfigError:
            continue
        considered += 1
        peak, comm = _quick(c, layout, options)
        if peak > options.budget_bytes:
            continue
        t = step_time(c, layout, {k: comm.get(k, 0) for k in KINDS}, options.links)
        screened.append(Screened(c, layout, peak, t.total_s))
    screened.sort(key=lambda s: s.step_s)
    plans: list[Plan] = []
    for s in screened[: screen or 4 * top]:
        plan = make_plan(s.cfg, s.layout, options)
        if plan.fits:
            plans.append(plan)
        if len(plans) == top:
            break
    plans.sort(key=lambda p: p.step.total_s)
    return plans, considered, len(screened)
