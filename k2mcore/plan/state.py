"""Model state per rank: parameters, DDP buffers and optimizer state, as the trainer allocates them.

Pure python (no torch or megatron), from the config and the resolved Layout alone. It rebuilds what
megatron-core 0.19.2 and k2mcore allocate on each rank:

- **Parameters** of one rank: its TP (vocab, column, row) and expert-TP shards, its pipeline
  chunks, its EP share of the routed experts (`megatron_param_shapes` in module order).
- **DDP buffers** (k2mcore.parallel.ddp.wrap_ddp): per chunk one dense buffer and, at EP > 1,
  one expert buffer; one bucket each (no overlap). With the distributed optimizer the params live
  in a param buffer of the training dtype and the gradients in an fp32 buffer
  (grad_reduce_in_fp32), both of the padded buffer size: megatron's layout (backprop order,
  64-element starts, end padded to lcm(dp, 128)) for AdamW, k2mcore's owner-aligned layout
  (k2mcore.optim.muonclip.shard_plan) for MuonClip. Without it there is no padding and no param
  buffer.
- **Optimizer state** of the rank's ZeRO-1 shard (the elements of its parameters inside it,
  padding excluded): fp32 master weights when the params are bf16 (fp32 params are their own
  master: megatron views them), Adam's two moments for AdamW elements, Muon's momentum alone for
  MuonClip's Muon matrices (ShardedMuonClip keeps a zero-stride placeholder for the second
  moment). Without the distributed optimizer every rank holds the state of all its params.
  Per-parameter scalar step counters (4 bytes each) are bookkeeping and not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from k2mcore.config.schema import K2Config
from k2mcore.optim.muonclip.shard_plan import (
    ALIGN,
    BufferPlan,
    ChunkPlan,
    ParamSpec,
    StageChunk,
    StagePlan,
    World,
    megatron_end_divisor,
    plan_stage,
    spec_for,
)
from k2mcore.parallel.layout import Layout
from k2mcore.parallel.param_counts import megatron_param_shapes

GRAD_BYTES = 4  # DDP's grad_reduce_in_fp32=True: fp32 main grads on every device
MASTER_BYTES = 4  # fp32 master weights and optimizer moments

# TP split of each parameter kind (megatron's local spec; k2mcore's ReplicatedLinear keeps the
# q/kv down-projections whole): name suffix -> partition dim; absent: replicated
_COLUMN = ("linear_q_proj.weight", "linear_q_up_proj.weight", "linear_kv_up_proj.weight",
           "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def local_numel(name: str, shape: tuple, layout: Layout) -> int:
    """Elements of `name` (unsharded `shape`) on one rank: TP or, for routed experts, ETP."""
    n = math.prod(shape)
    if not name.endswith(_COLUMN + _ROW):
        return n
    split = layout.etp if _is_routed_expert(name) else layout.tp
    return n // split


def stage_chunks(cfg: K2Config, layout: Layout, pp_rank: int,
                 shapes: Optional[dict] = None) -> list[StageChunk]:
    """The StageChunks of one pipeline rank with each parameter's local (TP/ETP) numel and the
    full matrix shape Newton-Schulz sees: the specs OwnerAlignedLayout builds from the model.
    Routed experts form the expert buffer at EP > 1 (megatron marks them allreduce=False only
    then), EP rank e holding experts e*E/ep .. (e+1)*E/ep - 1."""
    m = cfg.model
    shapes = shapes if shapes is not None else megatron_param_shapes(m)
    router_in_muon = cfg.optimizer.muon.router_in_muon
    chunks = []
    for v, text in enumerate(layout.stages[pp_rank]):
        layers = set(layout.layer_ids(pp_rank, v))
        names = []
        if "E" in text:
            names.append("embedding.word_embeddings.weight")
        names += [n for n in shapes if n.startswith("decoder.layers.")
                  and int(n.split(".")[2]) in layers]
        if "L" in text:
            names += [n for n in shapes if n.startswith(("decoder.final_layernorm.",
                                                         "output_layer."))]
        dense: list = []
        experts: list = [[] for _ in range(layout.ep)] if layout.ep > 1 else []
        per = m.num_experts // layout.ep
        for n in names:
            spec = spec_for(n, shapes[n], numel=local_numel(n, shapes[n], layout),
                            router_in_muon=router_in_muon)
            if layout.ep > 1 and _is_routed_expert(n):
                experts[int(n.split(".local_experts.")[1].split(".")[0]) // per].append(spec)
            else:
                dense.append(spec)
        if experts and not any(experts):
            experts = []
        chunks.append(StageChunk(dense=dense, experts=experts))
    return chunks


def zero1_plan(params: list[ParamSpec], dp: int, *, pad: bool = True) -> BufferPlan:
    """megatron's DistributedOptimizer buffer for `params` (model order) over `dp` equal shards:
    positions in backprop order, starts aligned to 64, the end padded to lcm(dp, 128)
    (DistributedOptimizer._compute_per_buffer_param_layout, one bucket). pad=False: DDP's
    layout without the distributed optimizer (no padding, one shard holding everything)."""
    align = ALIGN if pad else 1
    pos, ranges = 0, {}
    for p in reversed(params):
        pos = -(-pos // align) * align
        ranges[p.name] = (pos, pos + p.numel)
        pos += p.numel
    numel = -(-pos // megatron_end_divisor(dp)) * megatron_end_divisor(dp) if pad else pos
    shards = dp if pad else 1
    size = numel // shards
    bounds = [(r * size, (r + 1) * size) for r in range(shards)]
    return BufferPlan(dp=shards, align=align, order=[p.name for p in reversed(params)],
                      param_range=ranges, shard_bounds=bounds, owner={}, ns_load=[0] * shards,
                      start_loads=[0] * shards, numel=numel,
                      padding=numel - sum(p.numel for p in params), zero1_numel=numel)


@dataclass(frozen=True)
class RankState:
    """Model state one rank allocates (bytes, except `params`)."""

    rank: int
    pp_rank: int
    params: int  # parameter elements held (TP/EP shards of its chunks)
    param_bytes: int  # the training-dtype params (DDP's padded param buffer with ZeRO-1)
    grad_bytes: int  # fp32 gradient buffers
    optimizer_bytes: int  # master weights + moments/momentum of its shard
    optimizer_shard: int  # parameter elements in its ZeRO-1 shard
    muon_shard: int  # of those, elements of Muon matrices (MuonClip)
    expert_optimizer_bytes: int = 0  # of optimizer_bytes, the routed experts' share

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def param_dtype_bytes(cfg: K2Config, device: str) -> int:
    """Bytes per parameter: train.dtype, where auto is bf16 on GPU and fp32 on CPU."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "gpu" else "fp32"
    return {"bf16": 2, "fp32": 4}[dtype]


def stage_plan(cfg: K2Config, layout: Layout, pp_rank: int,
               shapes: Optional[dict] = None) -> StagePlan:
    """The buffers of one pipeline stage as the trainer lays them out: owner-aligned for
    MuonClip (optimizer.muon.owner_aligned_shards), megatron's equal ZeRO-1 shards otherwise,
    unpadded single-shard buffers without the distributed optimizer."""
    world = World.from_layout(layout)
    chunks = stage_chunks(cfg, layout, pp_rank, shapes)
    muon = cfg.optimizer.name == "muonclip"
    if muon and cfg.optimizer.muon.owner_aligned_shards and cfg.parallel.distributed_optimizer:
        if not cfg.optimizer.muon.split_gated:
            chunks = [StageChunk(dense=[_unsplit(s) for s in c.dense],
                                 experts=[[_unsplit(s) for s in e] for e in c.experts])
                      for c in chunks]
        return plan_stage(chunks, world, pp_rank=pp_rank)
    pad = cfg.parallel.distributed_optimizer
    plans = [ChunkPlan(dense=zero1_plan(list(c.dense), world.dense_dp, pad=pad),
                       experts=[zero1_plan(list(e), world.expert_dp, pad=pad)
                                for e in c.experts]) for c in chunks]
    ranks = [world.rank(tp=t, cp=c, dp=d, pp=pp_rank) for t in range(world.tp)
             for c in range(world.cp) for d in range(world.dp)]
    return StagePlan(world=world, pp_rank=pp_rank, chunks=plans, loads={r: 0 for r in ranks})


def _unsplit(spec: ParamSpec) -> ParamSpec:
    return ParamSpec(spec.name, spec.numel, spec.shape, muon=spec.muon) if spec.muon else spec


def rank_state(cfg: K2Config, plan: StagePlan, rank: int, muon_names: set, *,
               device: str = "gpu") -> RankState:
    """What `rank` (a global rank of `plan`'s stage) allocates; `muon_names`: the stage's
    Muon matrices."""
    pbytes = param_dtype_bytes(cfg, device)
    muonclip = cfg.optimizer.name == "muonclip"
    zero1 = cfg.parallel.distributed_optimizer
    master = MASTER_BYTES if pbytes < MASTER_BYTES else 0
    params = buffer_numel = shard = muon_shard = expert_bytes = 0
    for buf, g in plan.buffers_of(rank):
        g = g if zero1 else 0
        pieces = buf.pieces(g)
        buffer_numel += buf.numel
        for name, (s, e) in buf.param_range.items():
            params += e - s
            own = sum(max(0, min(b, e) - max(a, s)) for a, b in pieces)
            shard += own
            muon = muonclip and name in muon_names
            muon_shard += own if muon else 0
            if _is_routed_expert(name):
                expert_bytes += own * (master + MASTER_BYTES * (1 if muon else 2))
    moments = 2 * MASTER_BYTES * (shard - muon_shard) + MASTER_BYTES * muon_shard
    return RankState(
        rank=rank, pp_rank=plan.pp_rank, params=params,
        param_bytes=pbytes * (buffer_numel if zero1 else params),
        grad_bytes=GRAD_BYTES * buffer_numel, optimizer_bytes=master * shard + moments,
        optimizer_shard=shard, muon_shard=muon_shard, expert_optimizer_bytes=expert_bytes)


def stage_states(cfg: K2Config, layout: Layout, pp_rank: int, *, device: str = "gpu",
                 shapes: Optional[dict] = None) -> list[RankState]:
    """Every rank of one pipeline stage (ranks differ by their expert and ZeRO-1 shards)."""
    shapes = shapes if shapes is not None else megatron_param_shapes(cfg.model)
    plan = stage_plan(cfg, layout, pp_rank, shapes)
    muon = {s.name for c in stage_chunks(cfg, layout, pp_rank, shapes)
            for s in list(c.dense) + [x for e in c.experts for x in e] if s.muon}
    return [rank_state(cfg, plan, r, muon, device=device) for r in _stage_ranks(plan.world, pp_rank)]


def _stage_ranks(w: World, pp_rank: int) -> list[int]:
    per = w.world_size // w.pp
    return list(range(pp_rank * per, (pp_rank + 1) * per))
