"""Turn megatron-core's (chained) DistributedOptimizer into MuonClip: each child's inner torch
AdamW is replaced by a ShardedMuonClip over the same parameter groups and shards.

Dense parameters are held by the ranks of one pipeline stage (TP x CP x DP); expert parameters by
the ranks of one (stage, expert-parallel rank) pair (ETP x EDP). One process group per kind of
holder set carries the Muon exchange; QK-Clip reduces logits over DP x CP.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor, nn

from k2mcore.optim.chain import child_optimizers
from k2mcore.optim.param_groups import split_params
from k2mcore.parallel.groups import ProcessGroups

from .hparams import MuonHyperParams
from .qk_clip import ShardedQKClip
from .sharded import ExchangePlan, OffloadPlan, ShardedMuonClip, _Matrix, _Piece, build_plan


def _holder_groups(groups: ProcessGroups) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(dense holders, expert holders) of this rank: collective over the world."""
    key = (groups.pp_rank, groups.ep_rank)
    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    mine = {}
    for kind, pick in (("dense", lambda k: k[0]), ("expert", lambda k: k)):
        for value in sorted({pick(k) for k in keys}):
            ranks = [r for r, k in enumerate(keys) if pick(k) == value]
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if value == pick(key):
                mine[kind] = group
    return mine["dense"], mine["expert"]


def _tp(expert: bool, groups: ProcessGroups) -> tuple[int, int]:
    """(size, rank) of the tensor parallelism that splits a dense or an expert weight."""
    if expert:
        return groups.layout.etp, groups.etp_rank
    return groups.layout.tp, groups.tp_rank


def _main_shard(child, param: nn.Parameter) -> Optional[tuple[Tensor, int]]:
    """This rank's fp32 master shard of a model weight and its flat offset, or None."""
    index = child.model_param_group_index_map.get(param)
    if index is None:
        return None
    group, order = index
    shard = child.optimizer.param_groups[group]["params"][order]
    return shard, child._get_model_param_range_map(param)["param"].start


def install_muonclip(
    optimizer,
    chunks: Sequence[nn.Module],
    hparams: MuonHyperParams,
    groups: ProcessGroups,
    *,
    router_in_muon: bool = True,
    split_gated: bool = True,
    qk_clip_threshold: Optional[float] = 100.0,
    qk_clip_alpha: float = 0.5,
    offloads: Sequence = (),
) -> list[ShardedMuonClip]:
    """Replace the inner optimizer of every DistributedOptimizer in `optimizer` (collective).

    `chunks`: the unwrapped model chunks (GPTModel), in order. `offloads`: this pipeline stage's
    Newton-Schulz offloads (k2mcore.optim.muonclip.ns_offload, from the owner-aligned layout's stage
    plan; the same list on every rank of the stage). Returns the new inner optimizers; the first
    one of the dense parameters carries the QK-Clip hook.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    children = child_optimizers(optimizer)
    if not all(isinstance(c, DistributedOptimizer) for c in children):
        raise ValueError("MuonClip needs megatron's distributed optimizer (parallel.distributed_optimizer: true)")
    split = split_params(chunks, router_in_muon=router_in_muon)
    gated = set(split.gated_names) if split_gated else set()
    named_muon = list(zip(split.muon_names, split.muon_params))
    for name, p in named_muon:
        if p.ndim != 2:
            raise ValueError(f"MuonClip (distributed): {name} has shape {tuple(p.shape)}; "
                             "experts must be per-expert matrices (SequentialMLP or TE's grouped MLP)")
    dense_group, expert_group = _holder_groups(groups)
    installed = []
    for child in children:
        held = {p for buf in child.buffers for p in buf.param_index_map}
        mine = [(n, p) for n, p in named_muon if p in held]
        kinds = {not getattr(p, "allreduce", True) for p in held}
        # at EP=1 megatron may put dense and expert buffers in one optimizer; their holder
        # sets are then the same ranks (ETP = TP is enforced at EP=1 by the config)
        expert = kinds == {True}
        matrices, local, shards = [], [], []
        for i, (name, p) in enumerate(mine):
            tp_size, tp_rank = _tp(not getattr(p, "allreduce", True), groups)
            sharded = bool(getattr(p, "tensor_model_parallel", False)) and tp_size > 1
            matrices.append(_Matrix(
                name=name, local_shape=tuple(p.shape), tp_size=tp_size if sharded else 1,
                partition_dim=int(getattr(p, "partition_dim", 0)) if sharded else 0,
                split_rows=2 if name in gated else 1))
            found = _main_shard(child, p)
            if found is None:
                local.append(None)
                continue
            shard, start = found
            local.append(_Piece(tp_rank=tp_rank if sharded else 0, start=start,
                                end=start + shard.numel(), source=sharded or tp_rank == 0))
            shards.append((shard, i))
        plan: ExchangePlan = build_plan(matrices, local, expert_group if expert else dense_group)
        offload = _offload_plan([m for m in offloads if m.expert == expert], matrices,
                                len(chunks), dense_group, groups)
        if offload is not None and any(plan.owner[i] != plan.rank for jobs in offload.send
                                       for i, _ in jobs):
            raise RuntimeError("MuonClip offload: a matrix planned on this rank is owned by "
                               "another (owner-aligned shards expected)")
        inner = child.optimizer
        new = ShardedMuonClip.from_inner(inner, plan=plan, muon=shards, hparams=hparams,
                                         offload=offload)
        child.optimizer = new
        child.init_state_fn = new.init_state
        installed.append((expert, new, child))
    dense = [(new, child) for expert, new, child in installed if not expert]
    if qk_clip_threshold is not None and dense:
        new, child = dense[0]
        new.post_step_hooks.append(ShardedQKClip(
            chunks, qk_clip_threshold, alpha=qk_clip_alpha,
            group=groups.dp_cp_group,
            shard_of=lambda w, child=child: _main_shard(child, w)))
    return [new for _, new, _ in installed]


def _offload_plan(offloads: Sequence, matrices: list[_Matrix], num_chunks: int,
                  stage_group: dist.ProcessGroup, groups: ProcessGroups) -> Optional[OffloadPlan]:
    """This rank's sends and receives among the stage's offloads of one optimizer (dense or
    expert); None when the stage has none, so no rank of it runs the exchange."""
    if not offloads:
        return None
    from .shard_plan import World

    world, me = World.from_layout(groups.layout), dist.get_rank()
    planned = world.rank(tp=groups.tp_rank, dp=groups.dp_rank, pp=groups.pp_rank)  # CP is 1
    if planned != me:  # the planner numbers ranks as megatron's RankGenerator does
        raise RuntimeError(f"MuonClip offload: rank {me} is rank {planned} in the shard plan")
    index = {m.name: i for i, m in enumerate(matrices)}
    size = dist.get_world_size(stage_group)
    send: list = [[] for _ in range(size)]
    recv: list = [[] for _ in range(size)]
    for m in offloads:
        holder = dist.get_group_rank(stage_group, m.holder)
        helper = dist.get_group_rank(stage_group, m.helper)
        if m.holder == me:
            name = f"chunk{m.chunk}.{m.name}" if num_chunks > 1 else m.name
            i = index.get(name)
            if i is None or matrices[i].split_rows != m.halves:
                raise RuntimeError(f"MuonClip offload: {name} is not a Muon matrix of this rank "
                                   f"as planned")
            send[helper].append((i, m.half))
        if m.helper == me:
            recv[holder].append(tuple(m.shape))
    return OffloadPlan(group=stage_group, size=size, send=send, recv=recv)
