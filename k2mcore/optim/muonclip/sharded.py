"""MuonClip inside megatron-core's DistributedOptimizer: AdamW stays ZeRO-1, and every Muon
matrix's Newton-Schulz runs once, on the full matrix, on one rank.

megatron's DistributedOptimizer keeps doing what it does for every parameter: gradients are
reduce-scattered over data parallelism into fp32 main-param shards (element-wise ZeRO-1 slices
of its flat buffers), clipped, handed to an inner torch optimizer, copied back to the model
weights and all-gathered. `ShardedMuonClip` is that inner optimizer. It steps AdamW on the
non-matrix shards and, for the Muon matrices:

1. momentum and Nesterov input on the local shard (element-wise, so the state is a ZeRO slice that
   k2mcore's checkpoints save as boxes of the model-space tensor, under `exp_avg`, and reshard
   across layouts: k2mcore.optim.state_boxes);
2. one all_to_all over the ranks that hold the matrix (its TP or ETP shards times its DP or
   expert-DP replicas) sends each piece to the matrix's owner, picked to balance Newton-Schulz
   FLOPs (longest job first);
3. the owner rebuilds the full matrix (TP shards and SwiGLU gate/up blocks put back in place),
   orthogonalizes it, batched over equal shapes, and a second all_to_all returns to every holder
   the slice of the update that matches its shard;
4. each holder applies W <- W - lr (O + wd W) to its fp32 master shard; then post-step hooks run
   (QK-Clip scales rows of the master shards), before megatron copies the masters to the model
   weights and all-gathers them, so weights and master copies stay consistent.

Why not megatron's own Muon (megatron.core.optimizer.muon): it needs the `emerging_optimizers`
package, does not combine with this element-wise distributed optimizer (its layer-wise optimizer
saves state for one DP size), and its TP "blockwise" mode orthogonalizes TP shards on their own,
so the update depends on the TP degree.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from k2mcore import platform

from .hparams import MuonHyperParams
from .muon import nesterov_input, rms_match_scale
from .newton_schulz import default_ns_dtype, newton_schulz, ns_flops


def state_placeholder(like: Tensor) -> Tensor:
    """A zero-stride zero tensor shaped like `like`: stands for Adam's `exp_avg_sq` on a Muon
    shard, which megatron's checkpoint code requires for every parameter, without its memory."""
    return torch.zeros((), dtype=torch.float32, device=like.device).expand(like.shape)


def is_state_placeholder(t: Any) -> bool:
    return isinstance(t, Tensor) and t.numel() > 1 and all(s == 0 for s in t.stride())


@dataclass
class _Matrix:
    """One Muon matrix as held by the ranks of a holder group (identical on all of them)."""

    name: str
    local_shape: tuple[int, int]  # this TP rank's shard, as the parameter is stored
    tp_size: int  # number of TP shards (1: replicated over TP, or TP=1)
    partition_dim: int  # dim along which TP shards are concatenated
    split_rows: int  # SwiGLU fc1: 2 blocks [gate; up] in every TP shard

    @property
    def full_shape(self) -> tuple[int, int]:
        shape = list(self.local_shape)
        shape[self.partition_dim] *= self.tp_size
        return tuple(shape)  # type: ignore[return-value]

    @property
    def cost(self) -> int:
        n, m = self.full_shape
        return self.split_rows * ns_flops(n // self.split_rows, m)

    def assemble(self, shards: Tensor) -> Tensor:
        """[tp_size, *local_shape] -> full matrix, gate/up blocks of every shard in place."""
        if self.tp_size == 1:
            return shards[0]
        if self.partition_dim == 1:
            return torch.cat(list(shards), dim=1)
        k = self.split_rows
        blocks = shards.view(self.tp_size, k, -1, self.local_shape[1])  # [tp, k, rows/k, cols]
        return blocks.transpose(0, 1).reshape(self.full_shape)

    def split(self, full: Tensor) -> Tensor:
        """Inverse of assemble: full matrix -> [tp_size, *local_shape]."""
        if self.tp_size == 1:
            return full.unsqueeze(0)
        if self.partition_dim == 1:
            return torch.stack(full.chunk(self.tp_size, dim=1))
        k = self.split_rows
        blocks = full.view(k, self.tp_size, -1, self.local_shape[1]).transpose(0, 1)
        return blocks.reshape(self.tp_size, *self.local_shape)


@dataclass
class _Piece:
    """What one rank holds of one matrix: a slice [start, end) of its flattened TP shard."""

    tp_rank: int  # which TP shard (0 for a TP-replicated matrix)
    start: int
    end: int
    source: bool  # sends its piece (a TP-replicated matrix's copies on TP rank > 0 only receive)


@dataclass
class ExchangePlan:
    """Who owns which matrix and which pieces move where; the same on every holder rank."""

    group: Optional[dist.ProcessGroup]
    size: int
    rank: int
    matrices: list[_Matrix]
    pieces: list[list[Optional[_Piece]]]  # [group rank][matrix]
    owner: list[int]  # [matrix] -> group rank
    ns_flops: list[int] = field(default_factory=list)  # [group rank] Newton-Schulz FLOPs per step

    def __post_init__(self) -> None:
        """This rank's traffic, worked out once (each step only follows it), in matrix order:
        send[d] its pieces for owner d, recv[s] the pieces rank s sends it as owner,
        ret[d] the slices it returns to d, back[o] the slices owner o returns to it."""
        me, n = self.rank, self.size
        #: every piece already sits on its matrix's owner (owner-aligned shards without TP):
        #: the exchanges would move nothing, so none is run
        self.silent = all(o == r for i, o in enumerate(self.owner)
                          for r in range(n) if self.pieces[r][i] is not None)
        self.send: list[list[int]] = [[] for _ in range(n)]
        self.recv: list[list[int]] = [[] for _ in range(n)]
        self.ret: list[list[int]] = [[] for _ in range(n)]
        self.back: list[list[int]] = [[] for _ in range(n)]
        for i, o in enumerate(self.owner):
            mine = self.pieces[me][i]
            if mine is not None:
                self.back[o].append(i)
                if mine.source:
                    self.send[o].append(i)
            if o != me:
                continue
            for r in range(n):
                piece = self.pieces[r][i]
                if piece is not None:
                    self.ret[r].append(i)
                    if piece.source:
                        self.recv[r].append(i)

    def numel(self, r: int, i: int) -> int:
        piece = self.pieces[r][i]
        return 0 if piece is None else piece.end - piece.start


@dataclass
class OffloadPlan:
    """This optimizer's part of its pipeline stage's Newton-Schulz offloads (ns_offload.py),
    the same job order on both sides of every pair: `send[d]` the (matrix, row block) jobs this
    rank owns and pipeline-stage rank d runs, `recv[s]` the block shapes it runs for rank s."""

    group: Optional[dist.ProcessGroup]  # the ranks of this pipeline stage
    size: int
    send: list[list[tuple[int, int]]]
    recv: list[list[tuple[int, int]]]


def balance(costs: Sequence[int], size: int,
            candidates: Optional[Sequence[Optional[Sequence[int]]]] = None) -> list[int]:
    """Owner per job, greedy longest-processing-time first; deterministic (ties by index, then
    rank). `candidates[i]`: the ranks job i may go to (None: any)."""
    owner = [0] * len(costs)
    if candidates is None:
        heap = [(0, r) for r in range(size)]
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, r = heapq.heappop(heap)
            owner[i] = r
            heapq.heappush(heap, (load + costs[i], r))
        return owner
    loads = [0] * size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(candidates[i] or range(size), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def _whole_holders(pieces: list[list[Optional[_Piece]]], i: int, m: _Matrix) -> list[int]:
    """Ranks holding a whole TP shard of matrix i as a source: where owner-aligned shards put
    it, so Newton-Schulz runs where the gradient already is."""
    numel = math.prod(m.local_shape)
    return [r for r, mine in enumerate(pieces)
            if mine[i] is not None and mine[i].source and mine[i].start == 0 and mine[i].end == numel]


def build_plan(
    matrices: list[_Matrix], local: list[Optional[_Piece]], group: Optional[dist.ProcessGroup]
) -> ExchangePlan:
    """Collective over `group` (None or size 1: this rank alone holds everything)."""
    size = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    pieces: list[list[Optional[_Piece]]] = [local]
    if size > 1:
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, ([m.name for m in matrices], local), group=group)
        if any(names != [m.name for m in matrices] for names, _ in gathered):
            raise RuntimeError("MuonClip: ranks holding the same parameters list different Muon matrices")
        pieces = [p for _, p in gathered]
    owner = balance([m.cost for m in matrices], size,
                    [_whole_holders(pieces, i, m) for i, m in enumerate(matrices)])
    flops = [0] * size
    for i, o in enumerate(owner):
        flops[o] += matrices[i].cost
    return ExchangePlan(group, size, rank, matrices, pieces, owner, flops)


class ShardedMuonClip(torch.optim.AdamW):
    """The inner optimizer of a megatron DistributedOptimizer: AdamW on every shard, except
    the `muon` shards, which take the distributed Muon update (module docstring).

    `muon`: (main-param shard, matrix index) of this rank's Muon pieces; `plan`: the exchange.
    `post_step_hooks` run after the update on the fp32 master shards (QK-Clip).
    """

    @classmethod
    def from_inner(
        cls, inner: torch.optim.Optimizer, *, plan: ExchangePlan, muon: list[tuple[Tensor, int]],
        hparams: MuonHyperParams, offload: Optional[OffloadPlan] = None,
    ) -> "ShardedMuonClip":
        """Take over megatron's (fresh) inner Adam: its param groups, which already hold the
        main-param shards (views torch's constructor would refuse as non-leaf tensors) and the
        scheduler's lr/wd. torch's AdamW is taken over as it is; another Adam (TE's FusedAdam
        on GPU) gives its groups to a torch AdamW with the same lr, betas, eps and wd."""
        if len(inner.state):
            raise TypeError("ShardedMuonClip takes over an optimizer that has not stepped")
        self = cls.__new__(cls)
        if isinstance(inner, torch.optim.AdamW):
            self.__dict__.update(inner.__dict__)
        else:
            d = inner.defaults
            template = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=d["lr"],
                                         betas=tuple(d.get("betas", (0.9, 0.999))),
                                         eps=d.get("eps", 1e-8), weight_decay=d.get("weight_decay", 0.0))
            self.__dict__.update(template.__dict__)
            self.param_groups = []
            for group in inner.param_groups:  # the same dicts: megatron and its scheduler hold them
                for key, value in self.defaults.items():
                    group.setdefault(key, value)
                if "decoupled_weight_decay" in self.defaults:  # AdamW's, whatever the inner's was
                    group["decoupled_weight_decay"] = True
                self.param_groups.append(group)
        self.plan = plan
        self.offload = offload
        self.hparams = hparams
        self.muon = muon
        self._muon_ids = {id(p) for p, _ in muon}
        self.post_step_hooks: list[Callable[["ShardedMuonClip"], None]] = []
        self.comm_bytes = 0  # bytes this rank sent in Muon exchanges since the last reset
        return self

    def init_state(self, opt: Any = None, config: Any = None) -> None:
        """megatron's init_state_fn: Adam moments for AdamW shards, momentum for Muon shards."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state):
                    continue
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = state_placeholder(p) if id(p) in self._muon_ids else torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p, _ in self.muon]
        for p, _ in self.muon:  # AdamW skips parameters without a gradient
            p.grad = None
        try:
            super().step()
        finally:
            for (p, _), g in zip(self.muon, grads):
                p.grad = g
        self._muon_step()
        for hook in self.post_step_hooks:
            hook(self)
        return loss

    def _muon_step(self) -> None:
        h = self.hparams
        # looked up each step: load_state_dict replaces the group dicts the scheduler updates
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        inputs: dict[int, Tensor] = {}
        for p, i in self.muon:
            state = self.state[p]
            if len(state) == 0:
                self.init_state()
            state["step"] += 1
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            inputs[i] = nesterov_input(grad, state["exp_avg"], momentum=h.momentum, nesterov=h.nesterov).reshape(-1)
        updates = self._exchange_and_orthogonalize(inputs)
        for p, i in self.muon:
            group = group_of[id(p)]
            m = self.plan.matrices[i]
            # the RMS-matching scale, applied here in fp32 (the exchange carries NS's raw output)
            scale = rms_match_scale((m.full_shape[0] // m.split_rows, m.full_shape[1]))
            lr = group["lr"] * h.lr_scale
            wd = group["weight_decay"] if h.weight_decay is None else h.weight_decay
            p.mul_(1 - lr * wd)
            p.add_(updates[i].view_as(p).to(p.dtype), alpha=-lr * scale)

    def _exchange_and_orthogonalize(self, inputs: dict[int, Tensor]) -> dict[int, Tensor]:
        """Pieces to owners, Newton-Schulz on full matrices, its output's slices back to holders.

        Both exchanges carry Newton-Schulz's compute dtype (bf16 on GPU): the owner would cast
        its input to it first and its output is in it, so nothing is lost on the wire.
        """
        plan, me = self.plan, self.plan.rank
        device = next(iter(inputs.values())).device if inputs else _device()
        wire = self.hparams.ns_dtype or default_ns_dtype(torch.device(device))
        inputs = {i: t.to(wire) for i, t in inputs.items()}
        # 1. every source piece to its matrix's owner
        send = [inputs[i] for dst in range(plan.size) for i in plan.send[dst]]
        send_sizes = [sum(plan.numel(me, i) for i in plan.send[dst]) for dst in range(plan.size)]
        recv_sizes = [sum(plan.numel(src, i) for i in plan.recv[src]) for src in range(plan.size)]
        received = self._all_to_all(send, send_sizes, recv_sizes, device, wire)
        # 2. rebuild and orthogonalize the owned matrices
        owned = [i for i, o in enumerate(plan.owner) if o == me]
        shards = {i: torch.zeros(plan.matrices[i].tp_size, math.prod(plan.matrices[i].local_shape),
                                 dtype=wire, device=device) for i in owned}
        chunks = iter(received.split([plan.numel(src, i) for src in range(plan.size) for i in plan.recv[src]]))
        for src in range(plan.size):
            for i in plan.recv[src]:
                piece = plan.pieces[src][i]
                shards[i][piece.tp_rank, piece.start:piece.end] = next(chunks)
        results = self._orthogonalize({i: plan.matrices[i].assemble(
            shards[i].view(-1, *plan.matrices[i].local_shape)) for i in owned}, device, wire)
        local = {i: plan.matrices[i].split(results[i]).reshape(plan.matrices[i].tp_size, -1) for i in owned}
        # 3. every holder's slice of the update back to it
        send = [local[i][plan.pieces[dst][i].tp_rank, plan.pieces[dst][i].start:plan.pieces[dst][i].end]
                for dst in range(plan.size) for i in plan.ret[dst]]
        send_sizes = [sum(plan.numel(dst, i) for i in plan.ret[dst]) for dst in range(plan.size)]
        recv_sizes = [sum(plan.numel(me, i) for i in plan.back[src]) for src in range(plan.size)]
        back = self._all_to_all(send, send_sizes, recv_sizes, device, wire)
        order = [i for src in range(plan.size) for i in plan.back[src]]
        return dict(zip(order, back.split([plan.numel(me, i) for i in order])))

    def _orthogonalize(self, full: dict[int, Tensor], device: Any, dtype: torch.dtype) -> dict[int, Tensor]:
        """Newton-Schulz (unscaled) on the owned matrices, row block by row block (a fused
        SwiGLU fc1's gate and up halves on their own); the offloaded blocks go to their helpers
        and come back, and this rank runs the blocks it helps with alongside its own."""
        plan, off = self.plan, self.offload
        blocks: dict[tuple, Tensor] = {}
        for i, t in full.items():
            for h, block in enumerate(t.view(plan.matrices[i].split_rows, -1, t.shape[-1])):
                blocks[("own", i, h)] = block
        if off is not None:
            away = [blocks.pop(("own", i, h)) for d in range(off.size) for i, h in off.send[d]]
            got = self._offload_all_to_all(
                [b.reshape(-1) for b in away], [[b.numel() for b in self._blocks_to(d, full)]
                                                for d in range(off.size)],
                [[r * c for r, c in off.recv[s]] for s in range(off.size)], device, dtype)
            for s, parts in enumerate(got):
                for j, (part, shape) in enumerate(zip(parts, off.recv[s])):
                    blocks[("help", s, j)] = part.view(shape)
        outs = self._ns_batched(blocks)
        if off is not None:
            back = self._offload_all_to_all(
                [outs.pop(("help", s, j)).reshape(-1) for s in range(off.size)
                 for j in range(len(off.recv[s]))],
                [[r * c for r, c in off.recv[s]] for s in range(off.size)],
                [[b.numel() for b in self._blocks_to(d, full)] for d in range(off.size)],
                device, dtype)
            for d, parts in enumerate(back):
                for (i, h), part in zip(off.send[d], parts):
                    outs[("own", i, h)] = part
        return {i: torch.cat([outs[("own", i, h)].reshape(-1) for h in
                              range(plan.matrices[i].split_rows)]).view(t.shape)
                for i, t in full.items()}

    def _blocks_to(self, d: int, full: dict[int, Tensor]) -> list[Tensor]:
        """The row blocks this rank sends to stage rank d for NS (views, for their sizes)."""
        plan = self.plan
        return [full[i].view(plan.matrices[i].split_rows, -1, full[i].shape[-1])[h]
                for i, h in self.offload.send[d]]

    def _ns_batched(self, blocks: dict[tuple, Tensor]) -> dict[tuple, Tensor]:
        h = self.hparams
        by_shape: dict[tuple, list] = {}
        for key, t in blocks.items():
            by_shape.setdefault(tuple(t.shape), []).append(key)
        out: dict[tuple, Tensor] = {}
        for keys in by_shape.values():
            o = newton_schulz(torch.stack([blocks[k] for k in keys]), h.ns_steps, h.coefficients,
                              h.eps, dtype=blocks[keys[0]].dtype)
            out.update(zip(keys, o))
        return out

    def _offload_all_to_all(self, parts: list[Tensor], send: list[list[int]],
                            recv: list[list[int]], device: Any, dtype: torch.dtype) -> list[list[Tensor]]:
        """One all_to_all over the stage; [src][job] -> the flat tensors received."""
        off = self.offload
        send_sizes, recv_sizes = [sum(x) for x in send], [sum(x) for x in recv]
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(out, flat.contiguous(), recv_sizes, send_sizes, group=off.group)
        self.comm_bytes += flat.element_size() * sum(send_sizes)
        pieces = iter(out.split([n for sizes in recv for n in sizes]))
        return [[next(pieces) for _ in sizes] for sizes in recv]

    def _all_to_all(self, parts: list[Tensor], send_sizes: list[int], recv_sizes: list[int],
                    device: Any, dtype: torch.dtype) -> Tensor:
        send = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        if self.plan.size == 1 or self.plan.silent:  # every piece is its own destination
            return send
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(out, send.contiguous(), recv_sizes, send_sizes, group=self.plan.group)
        self.comm_bytes += send.element_size() * (sum(send_sizes) - send_sizes[self.plan.rank])
        return out

    @property
    def ns_flops_here(self) -> int:
        """Newton-Schulz FLOPs this rank runs per step: its owned matrices', less the row
        blocks it offloads, plus the blocks it runs for other ranks."""
        plan, off = self.plan, self.offload
        flops = plan.ns_flops[plan.rank]
        if off is not None:
            for jobs in off.send:
                for i, _ in jobs:
                    m = plan.matrices[i]
                    flops -= m.cost // m.split_rows
            flops += sum(ns_flops(r, c) for shapes in off.recv for r, c in shapes)
        return flops

    def zero_comm_counter(self) -> int:
        sent, self.comm_bytes = self.comm_bytes, 0
        return sent


def _device() -> Any:
    return platform.device()
