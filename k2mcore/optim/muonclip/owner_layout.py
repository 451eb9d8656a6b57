"""MuonClip's DDP buffers laid out by the owner-aligned shard planner (shard_plan.py).

`OwnerAlignedLayout` plans every buffer of this rank's pipeline stage once (all virtual chunks,
dense and expert buffers jointly, the same plan on every rank), hands DDP each chunk's layout
through megatron's `full_param_layout` hook, and registers each bucket's uneven shard bounds with
k2mcore.compat.uneven_shards once DDP has built it. With it the gradient reduce-scatter delivers
each Muon matrix's owner its whole (TP shard of the) reduced gradient, and the parameter
all-gather returns the update: MuonClip moves nothing else over data parallelism. Under
overlapped gradient reduction the first stage's first chunk is cut into buckets of
train.ddp_bucket_size, each owner-aligned on its own.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from k2mcore.optim.param_groups import split_params
from k2mcore.parallel.groups import ProcessGroups

from .ns_offload import plan_offload
from .shard_plan import ParamSpec, StageChunk, StagePlan, World, plan_stage, to_full_param_layout


def _full_shape(p: nn.Parameter, groups: ProcessGroups) -> tuple:
    """The matrix Newton-Schulz sees: TP (or expert-TP) shards put back together."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        expert = not getattr(p, "allreduce", True)
        tp = groups.layout.etp if expert else groups.layout.tp
        shape[int(getattr(p, "partition_dim", 0))] *= tp
    return tuple(shape)


class OwnerAlignedLayout:
    """For `wrap_ddp(..., param_layout=...)`: `layout(index, chunk, ddp_config)` before DDP is
    built, `register(index, ddp_chunk)` after."""

    def __init__(self, chunks: Sequence[nn.Module], groups: ProcessGroups, *,
                 router_in_muon: bool = True, split_gated: bool = True,
                 offload_budget: float = 0.0, wire_bytes: int = 2,
                 bucket_size: Optional[int] = None) -> None:
        """`offload_budget`: optimizer.muon.ns_offload_budget, the bytes NS offloads may send
        per step as a fraction of the stage's ZeRO-1 bytes; `wire_bytes`: the NS dtype's size;
        `bucket_size`: DDP's bucket size under overlapped gradient reduction (None: one bucket
        per buffer), which cuts the first stage's first chunk as megatron would."""
        self.groups = groups
        self.router_in_muon, self.split_gated = router_in_muon, split_gated
        self._specs = [self._chunk_specs(c) for c in chunks]
        stage_chunks = [StageChunk(dense=d, experts=[e] * groups.layout.ep if e else [])
                        for d, e in self._specs]
        stage = plan_stage(stage_chunks, World.from_layout(groups.layout), pp_rank=groups.pp_rank,
                           bucket_size=bucket_size)
        param_bytes = next(iter(chunks[0].parameters())).element_size()
        zero1 = sum(stage.zero1_bytes_of(r, param_bytes=param_bytes) for r in stage.ranks)
        self.stage: StagePlan = plan_offload(stage, budget_bytes=int(offload_budget * zero1),
                                             wire_bytes=wire_bytes)

    @property
    def offloads(self) -> list:
        """This stage's Newton-Schulz offloads (k2mcore.optim.muonclip.ns_offload.Offload)."""
        return list(self.stage.offloads)

    def _chunk_specs(self, chunk: nn.Module) -> tuple[list, list]:
        """(dense specs, expert specs) of one chunk, in megatron's buffer grouping."""
        split = split_params(chunk, router_in_muon=self.router_in_muon)
        muon = set(split.muon_names)
        gated = set(split.gated_names) if self.split_gated else set()
        dense, expert = [], []
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            spec = ParamSpec(name, p.numel(), _full_shape(p, self.groups), muon=name in muon,
                             split_rows=2 if name in gated else 1)
            (expert if not getattr(p, "allreduce", True) else dense).append(spec)
        return dense, expert

    def _plans(self, index: int) -> tuple[Any, Optional[Any]]:
        plan = self.stage.chunks[index]
        return plan.dense, plan.experts[self.groups.ep_rank] if plan.experts else None

    def layout(self, index: int, chunk: nn.Module, ddp_config: Any) -> Any:
        dense, expert = self._plans(index)
        params = [(n, p) for n, p in chunk.named_parameters() if p.requires_grad]
        return to_full_param_layout(params, dense=dense, expert=expert,
                                    grad_reduce_in_fp32=ddp_config.grad_reduce_in_fp32)

    def register(self, index: int, ddp_chunk: Any) -> None:
        from k2mcore.compat import uneven_shards

        dense, expert = self._plans(index)
        for buffers, plan in ((ddp_chunk.buffers, dense), (ddp_chunk.expert_parallel_buffers, expert)):
            for buffer in buffers:
                if plan is None or len(buffer.buckets) != len(plan.bucket_ranges):
                    raise RuntimeError("owner-aligned MuonClip: DDP built "
                                       f"{len(buffer.buckets)} buckets where the plan has "
                                       f"{len(plan.bucket_ranges) if plan else 0}")
                for bucket, bounds in zip(buffer.buckets, plan.bucket_shard_bounds):
                    uneven_shards.register(bucket, bounds)
