"""Owner-aligned uneven ZeRO-1 shards: which DP rank runs Newton-Schulz (NS) on each Muon matrix,
where every parameter sits in the DDP buffer, and where each rank's shard begins and ends.

megatron's DistributedOptimizer cuts each buffer into dp EQUAL element ranges, so a Muon matrix
is spread over several ranks and MuonClip exchanges pieces (two all_to_alls) to run NS on whole
matrices. Here instead every Muon matrix lies whole inside the shard of the rank that owns it:
the (uneven) gradient reduce-scatter hands the owner its full reduced gradient and the (uneven)
parameter all-gather returns the update; nothing else moves. AdamW parameters (embedding, output
layer, norms) stay element-wise ZeRO-1 and are cut anywhere, also across shard boundaries.

`plan_buffer` plans one buffer: owners by longest-processing-time first on NS FLOPs (on top of
`start_loads`, the NS a rank already carries elsewhere), then the buffer order (rank 0's
matrices, then rank 1's, ...), with AdamW parameters in the gaps between the owners' blocks
(water-filling: ranks whose matrices are below the level get AdamW elements up to it), then the
cuts: the smallest largest shard this order allows, and within that as close to the level as
possible. Every parameter starts on an `align`-element boundary (megatron's pad_param_start: 64),
the buffer ends on lcm(dp, 128) (megatron's pad_bucket_end), and every cut is a multiple of
`align`. `plan_stage` plans a pipeline stage's dense buffers over the dense DP(-CP) group and its
expert buffers over each expert-DP group, chunk after chunk, with running NS loads per rank.
`to_megatron_layout` / `to_full_param_layout` turn plans into megatron 0.19.2 layouts for DDP's
`full_param_layout` (num_optimizer_shards=dp). With a bucket size (overlapped gradient reduction,
train.ddp_bucket_size) the first stage's first chunk is cut into buckets as megatron cuts them
(parameters in reverse order, a bucket closed once it holds the bucket size), and each bucket is
planned as a buffer of its own, with owners chosen over the whole buffer (`plan_buckets`): every
Muon matrix still lies whole in its owner's piece of its bucket.

Pure python: no torch or megatron at import (megatron is imported inside the two converters).
Deterministic: the same specs in the same order give the same plan on every rank.

Why this module is long: the planner, the world's rank layout (megatron's RankGenerator order),
the stage planner and the megatron converters belong together and share their validation.
"""
from __future__ import annotations

import heapq
import math
import numbers
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

ALIGN = 64  # megatron's pad_param_start


def ns_flops(p: int, q: int, steps: int = 5) -> int:
    """Matmul FLOPs of `steps` Newton-Schulz iterations on one p x q matrix (p <= q after transpose).

    Per step (2 FLOPs per multiply-add): A = X X^T costs 2 p^2 q; A^2 (p x p x p) costs 2 p^3;
    B X (p x p times p x q) costs 2 p^2 q. Total steps * (4 p^2 q + 2 p^3); element-wise
    scalings and the norm are O(pq) and not counted. Inputs with p > q are transposed first.
    """
    p, q = min(p, q), max(p, q)
    return steps * (4 * p * p * q + 2 * p**3)


def megatron_end_divisor(dp: int) -> int:
    """megatron's bucket_end_divisor without pad_buckets_for_high_nccl_busbw."""
    return math.lcm(dp, 128)


def _up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def zero1_numel(numels: Sequence[int], dp: int, *, align: int = ALIGN,
                end_divisor: Optional[int] = None) -> int:
    """Size of megatron's DistributedOptimizer buffer (one bucket) for params of these sizes:
    backprop order, starts aligned, end padded (its _compute_per_buffer_param_layout)."""
    pos = 0
    for n in reversed(list(numels)):
        pos = _up(pos, align) + n
    return _up(pos, end_divisor or megatron_end_divisor(dp))


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a buffer. `numel`: its elements in this buffer (this rank's TP shard);
    `shape`: for a Muon matrix, the matrix NS orthogonalizes (TP shards put together), 2-D or a
    3-D stack of experts; `split_rows`: fused SwiGLU fc1 is orthogonalized as 2 stacked halves."""

    name: str
    numel: int
    shape: tuple = ()
    muon: bool = False
    split_rows: int = 1

    def __post_init__(self) -> None:
        where = f"ParamSpec {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ParamSpec: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.numel, int) or self.numel < 0:
            raise ValueError(f"{where}: numel must be an integer >= 0, got {self.numel!r}")
        shape = tuple(self.shape) if self.shape else (self.numel,)
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"{where}: shape must hold integers >= 0, got {shape}")
        object.__setattr__(self, "shape", shape)
        if self.numel > math.prod(shape):
            raise ValueError(f"{where}: numel {self.numel} exceeds the shape {shape}")
        if not isinstance(self.split_rows, int) or self.split_rows < 1:
            raise ValueError(f"{where}: split_rows must be an integer >= 1, got {self.split_rows!r}")
        if self.muon:
            if len(shape) not in (2, 3):
                raise ValueError(f"{where}: a Muon matrix needs a 2-D or 3-D shape, got {shape}")
            if shape[-2] % self.split_rows:
                raise ValueError(f"{where}: split_rows {self.split_rows} does not divide the "
                                 f"{shape[-2]} rows of shape {shape}")

    @property
    def cost(self) -> int:
        """NS FLOPs per step (0 for AdamW), as distributed._Matrix.cost counts them."""
        if not self.muon:
            return 0
        batch = shape[0] if len(shape := self.shape) == 3 else 1
        rows, cols = shape[-2], shape[-1]
        return batch * self.split_rows * ns_flops(rows // self.split_rows, cols)


@dataclass
class BufferPlan:
    """The layout of one buffer over `dp` shards (ranks of its DP group, in group order)."""

    dp: int
    align: int
    order: list  # names in buffer order
    param_range: dict  # name -> (start, end) in the buffer
    shard_bounds: list  # [rank] -> (start, end); contiguous, cover [0, numel)
    owner: dict  # Muon matrix name -> rank
    ns_load: list  # [rank] NS FLOPs of this buffer's matrices
    start_loads: list  # [rank] the NS load it was planned on top of
    numel: int  # buffer size incl. padding
    padding: int
    zero1_numel: int  # megatron's DistributedOptimizer buffer for the same params
    costs: dict = field(default_factory=dict)  # Muon matrix name -> NS FLOPs
    shapes: dict = field(default_factory=dict)  # Muon matrix name -> (NS shape, split_rows)
    # [bucket][rank] -> (start, end) in the buffer, when cut into several buckets (plan_buckets;
    # shard_bounds is then empty); empty: one bucket, shard_bounds
    bucket_bounds: list = field(default_factory=list)

    @property
    def loads(self) -> list:
        """NS load per rank after this buffer: start_loads + ns_load."""
        return [a + b for a, b in zip(self.start_loads, self.ns_load)]

    @property
    def _buckets(self) -> list:
        """[bucket][rank] -> (start, end) in the buffer."""
        return self.bucket_bounds or [list(self.shard_bounds)]

    @property
    def bucket_ranges(self) -> list:
        """[bucket] -> (start, end) in the buffer."""
        return [(b[0][0], b[-1][1]) for b in self._buckets]

    @property
    def shard_numel(self) -> list:
        """[rank] -> elements of its shard (its pieces of every bucket)."""
        return [sum(b[r][1] - b[r][0] for b in self._buckets) for r in range(self.dp)]

    def pieces(self, rank: int) -> list:
        """(start, end) of `rank`'s piece of each bucket."""
        return [b[rank] for b in self._buckets]

    @property
    def bucket_shard_bounds(self) -> list:
        """[bucket][rank] -> (start, end) relative to the bucket, for the uneven reduce-scatter
        and all-gather of each bucket."""
        return [[(s - b[0][0], e - b[0][0]) for s, e in b] for b in self._buckets]

    def ranks_of(self, name: str) -> list:
        """Ranks whose shard holds part of `name` (one for a Muon matrix)."""
        s, e = self.param_range[name]
        return sorted({r for b in self._buckets for r, (a, c) in enumerate(b)
                       if a < e and s < c})

    def check(self) -> None:
        """Raise ValueError (one line) unless the plan's invariants hold."""
        buckets = self._buckets
        if buckets[0][0][0] != 0 or buckets[-1][-1][1] != self.numel:
            raise ValueError(f"shards do not cover [0, {self.numel}): {buckets}")
        flat = [piece for b in buckets for piece in b]
        for (_, e), (s, _) in zip(flat, flat[1:]):
            if e != s:
                raise ValueError(f"shards leave a gap or overlap at {e}/{s}")
        if any(s > e for s, e in flat):
            raise ValueError(f"a shard ends before it starts: {flat}")
        for n, (s, e) in self.param_range.items():
            if e > s and not any(a <= s and e <= c for a, c in self.bucket_ranges):
                raise ValueError(f"{n} ({s}, {e}) straddles a bucket boundary")
        spans = sorted(self.param_range[n] for n in self.order)
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"parameter ranges overlap at {s1}")
        for n, (s, e) in self.param_range.items():
            if s % self.align or s < 0 or e > self.numel:
                raise ValueError(f"{n}: range ({s}, {e}) unaligned or outside the buffer")
        for n, r in self.owner.items():
            s, e = self.param_range[n]
            if e > s and not any(a <= s < e <= b for a, b in self.pieces(r)):
                raise ValueError(f"{n} ({s}, {e}) is not inside its owner {r}'s shard "
                                 f"{self.pieces(r)}")


def _lpt(costs: Sequence[int], loads: list) -> list:
    """Owner per job, longest first (ties: lower job index), to the least loaded rank (ties:
    lower rank)."""
    heap = [(load, r) for r, load in enumerate(loads)]
    heapq.heapify(heap)
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner


def _level(sizes: Sequence[int], extra: int) -> Fraction:
    """Water level L: sum over ranks of max(0, L - size) = extra (all ranks when extra = 0 and
    sizes are equal)."""
    ordered = sorted(sizes)
    prefix = 0
    for k, size in enumerate(ordered, start=1):
        prefix += size
        level = Fraction(extra + prefix, k)
        if k == len(ordered) or level <= ordered[k]:
            return level
    return Fraction(0)


def _validate(params: Sequence[ParamSpec], dp: Any, start_loads: Any, align: Any) -> list:
    if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
        raise ValueError(f"plan_buffer: dp must be an integer >= 1, got {dp!r}")
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"plan_buffer: align must be an integer >= 1, got {align!r}")
    seen = set()
    for p in params:
        if not isinstance(p, ParamSpec):
            raise ValueError(f"plan_buffer: params must be ParamSpec, got {type(p).__name__}")
        if p.name in seen:
            raise ValueError(f"plan_buffer: duplicate parameter name {p.name!r}")
        seen.add(p.name)
    if start_loads is None:
        return [0] * dp
    loads = list(start_loads)
    if len(loads) != dp or any(not isinstance(x, numbers.Integral) or x < 0 for x in loads):
        raise ValueError(f"plan_buffer: start_loads must be {dp} integers >= 0, got {loads!r}")
    return [int(x) for x in loads]


def plan_buffer(params: Sequence[ParamSpec], dp: int, *, start_loads: Optional[Sequence[int]] = None,
                align: int = ALIGN, end_divisor: Optional[int] = None,
                owners: Optional[Mapping[str, int]] = None) -> BufferPlan:
    """Plan one buffer over `dp` ranks (module docstring). `end_divisor`: the buffer size is a
    multiple of it (default lcm(dp, 128), megatron's; must be a multiple of dp). `owners`: the
    Muon matrices' owners, decided elsewhere (plan_buckets: over all buckets at once)."""
    params = list(params)
    loads0 = _validate(params, dp, start_loads, align)
    end_divisor = math.lcm(end_divisor or megatron_end_divisor(dp), align)
    if end_divisor % dp:
        raise ValueError(f"plan_buffer: end_divisor {end_divisor} is not a multiple of dp {dp}")
    slot = [_up(p.numel, align) for p in params]
    muon = [i for i, p in enumerate(params) if p.muon]
    adamw = [i for i, p in enumerate(params) if not p.muon]
    owner_of = (dict(zip(muon, _lpt([params[i].cost for i in muon], loads0))) if owners is None
                else {i: owners[params[i].name] for i in muon})
    blocks: list = [[] for _ in range(dp)]
    for i in muon:
        blocks[owner_of[i]].append(i)
    sizes = [sum(slot[i] for i in b) for b in blocks]
    total = sum(slot)
    numel = _up(total, end_divisor)
    level = _level(sizes, total - sum(sizes))
    seq = _arrange(blocks, adamw, slot, [max(Fraction(0), level - s) for s in sizes], level)
    start: dict = {}
    pos = 0
    for i in seq:
        start[i] = pos
        pos += slot[i]
    bounds = _cuts(blocks, start, slot, sizes, numel, align)
    ns = [0] * dp
    for i in muon:
        ns[owner_of[i]] += params[i].cost
    return BufferPlan(
        dp=dp, align=align, order=[params[i].name for i in seq],
        param_range={params[i].name: (start[i], start[i] + params[i].numel) for i in seq},
        shard_bounds=bounds, owner={params[i].name: owner_of[i] for i in muon}, ns_load=ns,
        start_loads=loads0, numel=numel, padding=numel - sum(p.numel for p in params),
        zero1_numel=zero1_numel([p.numel for p in params], dp, align=align, end_divisor=end_divisor),
        costs={params[i].name: params[i].cost for i in muon},
        shapes={params[i].name: (params[i].shape, params[i].split_rows) for i in muon})


def bucket_split(params: Sequence[ParamSpec], bucket_size: int, *,
                 align: int = ALIGN) -> list:
    """megatron's buckets of one buffer: the parameters in reverse order (the order the backward
    produces their gradients), a bucket closed once its aligned elements reach `bucket_size`;
    each bucket's parameters in their original order. Bucket 0 holds the last parameters."""
    if not isinstance(bucket_size, int) or bucket_size < 1:
        raise ValueError(f"bucket_split: bucket_size must be an integer >= 1, got {bucket_size!r}")
    buckets, current, size = [], [], 0
    for p in reversed(list(params)):
        current.append(p)
        size = _up(size, align) + p.numel
        if size >= bucket_size:
            buckets.append(current[::-1])
            current, size = [], 0
    if current:
        buckets.append(current[::-1])
    return buckets


def plan_buckets(buckets: Sequence[Sequence[ParamSpec]], dp: int, *,
                 start_loads: Optional[Sequence[int]] = None, align: int = ALIGN) -> BufferPlan:
    """One buffer cut into `buckets` (bucket_split's), laid out one after the other: the owners
    of all its Muon matrices first, longest first over the whole buffer (so Newton-Schulz is as
    balanced as in one bucket), then each bucket planned as a buffer of its own with them."""
    if len(buckets) == 1:
        return plan_buffer(buckets[0], dp, start_loads=start_loads, align=align)
    loads = _validate([p for b in buckets for p in b], dp, start_loads, align)
    first = list(loads)
    muon = [p for b in buckets for p in b if p.muon]
    owners = {p.name: r for p, r in zip(muon, _lpt([p.cost for p in muon], loads))}
    merged: dict = {"order": [], "param_range": {}, "owner": {}, "costs": {}, "shapes": {},
                    "bucket_bounds": []}
    ns, offset, padding, zero1 = [0] * dp, 0, 0, 0
    for specs in buckets:
        plan = plan_buffer(specs, dp, start_loads=loads, align=align, owners=owners)
        merged["order"] += plan.order
        merged["param_range"].update({n: (s + offset, e + offset)
                                      for n, (s, e) in plan.param_range.items()})
        merged["owner"].update(plan.owner)
        merged["costs"].update(plan.costs)
        merged["shapes"].update(plan.shapes)
        merged["bucket_bounds"].append([(s + offset, e + offset) for s, e in plan.shard_bounds])
        ns = [a + b for a, b in zip(ns, plan.ns_load)]
        loads = plan.loads
        offset += plan.numel
        padding += plan.padding
        zero1 += plan.zero1_numel
    return BufferPlan(dp=dp, align=align, shard_bounds=[], ns_load=ns, start_loads=first,
                      numel=offset, padding=padding, zero1_numel=zero1, **merged)


def _arrange(blocks: list, adamw: list, slot: list, fills: list, level: Fraction) -> list:
    """Buffer order: gaps of AdamW params around the non-empty owner blocks, in rank order.

    Gap j lies between the j-th and (j+1)-th non-empty block; its capacity is the level of every
    empty rank inside it plus half the fill of each non-empty rank bounding it. AdamW params go,
    largest first, to the gap with the most room left (ties: the first gap)."""
    dp = len(blocks)
    full = [r for r in range(dp) if blocks[r]]
    edges = [-1] + full + [dp]
    cap = []
    for j in range(len(edges) - 1):
        left, right = edges[j], edges[j + 1]
        c = level * (right - left - 1)
        c += fills[left] / 2 if left >= 0 else 0
        c += fills[right] / 2 if right < dp else 0
        cap.append(c)
    gaps: list = [[] for _ in cap]
    room = list(cap)
    for i in sorted(adamw, key=lambda i: (-slot[i], i)):
        j = max(range(len(room)), key=lambda j: (room[j], -j))
        gaps[j].append(i)
        room[j] -= slot[i]
    seq: list = []
    for j, gap in enumerate(gaps):
        seq += sorted(gap)
        if j < len(full):
            seq += blocks[full[j]]
    return seq


def _cuts(blocks: list, start: dict, slot: list, sizes: list, numel: int, align: int) -> list:
    """Shard bounds: cut r lies between the last non-empty block before rank r and the first at
    or after it; the largest shard is minimised (binary search), then each cut goes as close to
    the water level of the ranks still to cut as that allows."""
    dp = len(blocks)
    lo, hi = [0] * (dp + 1), [numel] * (dp + 1)
    end_before = 0
    for r in range(dp):
        lo[r] = end_before
        if blocks[r]:
            end_before = start[blocks[r][-1]] + slot[blocks[r][-1]]
    nxt = numel
    for r in reversed(range(dp)):
        if blocks[r]:
            nxt = start[blocks[r][0]]
        hi[r] = nxt
    lo[dp] = hi[dp] = numel

    def feasible(cap: int) -> bool:
        c = 0
        for r in range(1, dp):
            c = min(hi[r], c + cap)
            if c < lo[r]:
                return False
        return numel - c <= cap

    a, b = 0, numel // align  # in units of align
    while a < b:
        m = (a + b) // 2
        if feasible(m * align):
            b = m
        else:
            a = m + 1
    cap = a * align
    earliest = [numel] * (dp + 1)  # smallest cut r from which the rest fits under cap
    for r in range(dp - 1, 0, -1):
        earliest[r] = max(lo[r], earliest[r + 1] - cap)
    cuts = [0]
    for r in range(dp - 1):
        c = cuts[-1]
        rest = numel - c
        level = _level(sizes[r:], max(0, rest - sum(sizes[r:])))
        want = c + max(level, Fraction(sizes[r]))
        want = math.floor(want / align + Fraction(1, 2)) * align
        low = max(lo[r + 1], c, earliest[r + 1])
        high = min(hi[r + 1], c + cap)
        cuts.append(min(max(want, low), high))
    cuts.append(numel)
    return list(zip(cuts, cuts[1:]))


# ---------------------------------------------------------------- the world and a pipeline stage
@dataclass(frozen=True)
class World:
    """Parallel sizes; ranks numbered as megatron 0.19.2's RankGenerator with its default order
    'tp-cp-ep-dp-pp': dense tp-cp-dp-pp, experts etp-ep-edp-pp (tp fastest)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "cp", "ep", "etp"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"World: {key} must be an integer >= 1, got {value!r}")
        if self.world_size % (self.etp * self.ep * self.pp):
            raise ValueError(
                f"World: world size {self.world_size} (tp*cp*dp*pp) is not divisible by "
                f"etp*ep*pp = {self.etp}*{self.ep}*{self.pp}")

    @classmethod
    def from_layout(cls, layout: Any) -> "World":
        """From k2mcore's resolved Layout (or anything with these six attributes)."""
        return cls(tp=layout.tp, pp=layout.pp, dp=layout.dp, cp=layout.cp, ep=layout.ep,
                   etp=layout.etp)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def dense_dp(self) -> int:
        """Size of the group the dense buffers are sharded over (DP x CP)."""
        return self.dp * self.cp

    def rank(self, *, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def expert_rank(self, *, etp: int = 0, ep: int = 0, edp: int = 0, pp: int = 0) -> int:
        return etp + self.etp * (ep + self.ep * (edp + self.expert_dp * pp))

    def dense_group(self, *, tp: int = 0, pp: int = 0) -> list:
        """The DP-CP group of (tp, pp), in group-rank order (cp fastest)."""
        return [self.rank(tp=tp, cp=c, dp=d, pp=pp) for d in range(self.dp) for c in range(self.cp)]

    def expert_dp_group(self, *, etp: int = 0, ep: int = 0, pp: int = 0) -> list:
        return [self.expert_rank(etp=etp, ep=ep, edp=j, pp=pp) for j in range(self.expert_dp)]


@dataclass
class StageChunk:
    """One virtual-pipeline chunk of a stage: its dense params (the same on every rank of the
    stage: TP shards of equal size) and, per EP rank, the expert params that rank holds."""

    dense: Sequence[ParamSpec] = ()
    experts: Sequence[Sequence[ParamSpec]] = ()


@dataclass
class ChunkPlan:
    dense: BufferPlan
    experts: list  # [ep rank] -> BufferPlan over that expert-DP group (empty: no experts)


@dataclass
class StagePlan:
    """The plans of one pipeline stage and the NS load of each of its ranks. With TP > 1 every
    TP rank at the owner's DP index is charged the matrix's full NS cost (whoever of them runs
    it, the others wait); ETP likewise."""

    world: World
    pp_rank: int
    chunks: list
    loads: dict  # global rank -> NS FLOPs over all chunks (after `offloads`)
    offloads: list = field(default_factory=list)  # k2mcore.optim.muonclip.ns_offload.Offload

    @property
    def ranks(self) -> list:
        return sorted(self.loads)

    def buffers_of(self, rank: int) -> list:
        """(plan, rank in its group) of every buffer `rank` holds, chunk by chunk."""
        w = self.world
        cp, d = rank // w.tp % w.cp, rank // (w.tp * w.cp) % w.dp
        ep, edp = rank // w.etp % w.ep, rank // (w.etp * w.ep) % w.expert_dp
        out = []
        for chunk in self.chunks:
            out.append((chunk.dense, cp + w.cp * d))
            if chunk.experts:
                out.append((chunk.experts[ep], edp))
        return out

    def bytes_of(self, rank: int, *, grad_bytes: int = 4, param_bytes: int = 2) -> int:
        """Collective input bytes: every buffer's gradient reduce-scatter (the whole buffer)
        plus its parameter all-gather (this rank's shard)."""
        return sum(grad_bytes * p.numel + param_bytes * p.shard_numel[g]
                   for p, g in self.buffers_of(rank))

    def zero1_bytes_of(self, rank: int, *, grad_bytes: int = 4, param_bytes: int = 2) -> int:
        """The same for megatron's equal ZeRO-1 shards of the same buffers."""
        return sum(grad_bytes * p.zero1_numel + param_bytes * p.zero1_numel // p.dp
                   for p, _ in self.buffers_of(rank))

    def state_numel_of(self, rank: int) -> int:
        """Elements of optimizer state (fp32 master + moments) `rank` holds: its shards."""
        return sum(p.shard_numel[g] for p, g in self.buffers_of(rank))

    def balance(self) -> dict:
        """NS load over the stage's ranks: `max`, `mean`, `largest` single NS job (a matrix, or
        one gate/up half of a fused SwiGLU fc1, which NS orthogonalizes on its own),
        `lower_bound` = max(largest, mean), and `group_lower_bound`, which also counts what the
        groups force when every matrix stays on its owner (no ns_offload): an expert-DP group's
        experts stay inside it, so its ranks carry at least their group's expert NS / expert_dp
        on average, and every dense matrix lands in some group, raising that average by its
        cost / expert_dp (at expert-DP 1: the rank's own experts plus the matrix). Both bound
        every plan's max from below (the group bound only without offloads)."""
        w = self.world
        values = list(self.loads.values())
        mean = sum(values) / len(values)
        expert = [0] * w.ep
        dense: list = []
        for chunk in self.chunks:
            dense += chunk.dense.costs.values()
            for e, plan in enumerate(chunk.experts):
                expert[e] += sum(plan.ns_load)
        plans = [p for ch in self.chunks for p in [ch.dense, *ch.experts]]
        largest = max((c // p.shapes[n][1] for p in plans for n, c in p.costs.items()), default=0)
        whole = max((c for p in plans for c in p.costs.values()), default=0)  # on its owner
        bounds = [mean, whole, max(expert) / w.expert_dp]
        if w.dense_dp > 1:
            bounds += [min(e + c for e in expert) / w.expert_dp for c in dense]
        return {"max": max(values), "mean": mean, "largest": largest,
                "lower_bound": max(largest, mean), "group_lower_bound": max(bounds)}

    def dense_index(self) -> list:
        """[dense group rank] -> the global ranks at that index (one per TP rank)."""
        w = self.world
        return [[w.rank(tp=t, cp=c, dp=d, pp=self.pp_rank) for t in range(w.tp)]
                for d in range(w.dp) for c in range(w.cp)]

    def expert_index(self, ep: int) -> list:
        """[expert-DP group rank] -> the global ranks at that index (one per ETP rank)."""
        w = self.world
        return [[w.expert_rank(etp=s, ep=ep, edp=j, pp=self.pp_rank) for s in range(w.etp)]
                for j in range(w.expert_dp)]


def plan_stage(chunks: Sequence[StageChunk], world: World, *, pp_rank: int = 0,
               align: int = ALIGN, bucket_size: Optional[int] = None) -> StagePlan:
    """Plan every buffer of pipeline stage `pp_rank`: chunk by chunk, the dense buffer over the
    DP-CP group (start loads per group rank: the most any TP rank at that index carries), then
    each EP rank's expert buffer over its expert-DP group (start loads likewise over ETP),
    adding each plan's NS to all TP/ETP ranks at the owner's index. `bucket_size`: cut the first
    stage's first chunk's buffers into buckets of about that many elements (megatron's rule for
    overlapped gradient reduction; every other chunk keeps one bucket per buffer)."""
    if not isinstance(pp_rank, int) or not 0 <= pp_rank < world.pp:
        raise ValueError(f"plan_stage: pp_rank must be in [0, {world.pp}), got {pp_rank!r}")
    stage = StagePlan(world=world, pp_rank=pp_rank, chunks=[], loads={})
    dense_idx = stage.dense_index()
    for idx in dense_idx:
        for r in idx:
            stage.loads[r] = 0
    for v, chunk in enumerate(chunks):
        if chunk.experts and len(chunk.experts) != world.ep:
            raise ValueError(f"plan_stage: chunk {v} lists experts for {len(chunk.experts)} EP "
                             f"ranks, the world has ep={world.ep}")
        def cut(specs: Sequence[ParamSpec]) -> list:
            if bucket_size is None or v > 0 or pp_rank > 0 or not specs:
                return [list(specs)]
            return bucket_split(specs, bucket_size, align=align)

        dense = plan_buckets(cut(chunk.dense), world.dense_dp, align=align,
                             start_loads=[max(stage.loads[r] for r in idx) for idx in dense_idx])
        _charge(stage.loads, dense_idx, dense.ns_load)
        experts = []
        for e, specs in enumerate(chunk.experts):
            idxs = stage.expert_index(e)
            plan = plan_buckets(cut(specs), world.expert_dp, align=align,
                                start_loads=[max(stage.loads[r] for r in idx) for idx in idxs])
            _charge(stage.loads, idxs, plan.ns_load)
            experts.append(plan)
        stage.chunks.append(ChunkPlan(dense=dense, experts=experts))
    return stage


def _charge(loads: dict, idxs: list, ns: list) -> None:
    for idx, flops in zip(idxs, ns):
        for r in idx:
            loads[r] += flops


# ---------------------------------------------------------------- K2 names and shapes
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_ADAMW_MARKERS = ("embedding.", "output_layer.")


def spec_for(name: str, shape: Sequence[int], *, numel: Optional[int] = None,
             router_in_muon: bool = True, gated_linear_unit: bool = True) -> ParamSpec:
    """ParamSpec by k2mcore.optim.param_groups.split_params' rules, from a name and shape."""
    shape = tuple(shape)
    is_router = name.endswith("router.weight")
    to_adamw = (len(shape) < 2 or name.startswith(_ADAMW_MARKERS)
                or any(f".{m}" in name for m in _ADAMW_MARKERS) or (is_router and not router_in_muon))
    n = math.prod(shape) if numel is None else numel
    if to_adamw:
        return ParamSpec(name, n, shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"no optimizer rule for parameter {name} of shape {shape}")
    gated = name.endswith("linear_fc1.weight") and gated_linear_unit
    return ParamSpec(name, n, shape, muon=True, split_rows=2 if gated else 1)


def stage_chunks_from_shapes(shapes: Mapping[str, Sequence[int]], layout: Any, pp_rank: int, *,
                             router_in_muon: bool = True) -> list:
    """StageChunks of one pipeline stage from k2mcore.parallel.layout.megatron_param_shapes
    (global layer and expert numbering) and a resolved Layout (`stages`, `layer_ids`, `ep`).
    EP rank e holds experts e*E/ep .. (e+1)*E/ep - 1. At EP = 1 megatron keeps the experts in
    the dense buffer (they are all-reduced like dense params), and so does this.
    TP = ETP = 1 only: with TP the local numel of each parameter depends on its TP split."""
    if layout.tp != 1 or layout.etp != 1:
        raise ValueError("stage_chunks_from_shapes: TP/ETP > 1 needs each parameter's TP "
                         "split; build ParamSpec(numel=<local>) yourself")
    chunks = []
    for v, text in enumerate(layout.stages[pp_rank]):
        prefixes = tuple(f"decoder.layers.{i}." for i in layout.layer_ids(pp_rank, v))
        names = [n for n in shapes if n.startswith(prefixes)] if prefixes else []
        if "E" in text:
            names = [n for n in shapes if n.startswith("embedding.")] + names
        if "L" in text:
            names += [n for n in shapes if n.startswith(("decoder.final_layernorm.", "output_layer."))]
        dense, by_expert = [], []
        for n in names:
            spec = spec_for(n, shapes[n], router_in_muon=router_in_muon)
            m = _EXPERT.search(n) if layout.ep > 1 else None
            if m:
                by_expert.append((int(m.group(1)), spec))
            else:
                dense.append(spec)
        experts: list = []
        if by_expert:
            count = 1 + max(e for e, _ in by_expert)
            if count % layout.ep:
                raise ValueError(f"{count} experts are not divisible by ep={layout.ep}")
            per = count // layout.ep
            experts = [[s for e, s in by_expert if e // per == rank] for rank in range(layout.ep)]
        chunks.append(StageChunk(dense=dense, experts=experts))
    return chunks


# ---------------------------------------------------------------- megatron layouts
NamedParams = Union[Mapping[str, Any], Iterable[tuple]]


def to_megatron_layout(plan: BufferPlan, params: NamedParams, *,
                       param_indices: Optional[list] = None):
    """A megatron PerBufferParamLayout for `plan` and the real parameters (name -> Parameter):
    the plan's buckets, num_optimizer_shards = plan.dp. The uneven shard bounds are
    plan.bucket_shard_bounds."""
    from megatron.core.optimizer.param_layout import PerBufferParamLayout

    named = dict(params.items() if isinstance(params, Mapping) else params)
    missing = [n for n in plan.order if n not in named]
    extra = [n for n in named if n not in plan.param_range]
    if missing or extra:
        raise ValueError(f"to_megatron_layout: parameters missing {missing[:3]} / not in the plan "
                         f"{extra[:3]}")
    ranges = plan.bucket_ranges
    index_map, last = {}, [0] * len(ranges)
    for name in plan.order:
        s, e = plan.param_range[name]
        if named[name].numel() != e - s:
            raise ValueError(f"to_megatron_layout: {name} has {named[name].numel()} elements, "
                             f"the plan {e - s}")
        bucket = next(i for i, (a, b) in enumerate(ranges) if a <= s and e <= b)
        index_map[named[name]] = (s, e, bucket)
        last[bucket] = max(last[bucket], e - ranges[bucket][0])
    return PerBufferParamLayout(param_index_map=index_map, bucket_indices=list(ranges),
                                per_bucket_numel_unpadded=last,
                                param_indices=list(param_indices or []),
                                num_optimizer_shards=plan.dp)


def to_full_param_layout(params: NamedParams, *, dense: Optional[BufferPlan] = None,
                         expert: Optional[BufferPlan] = None, grad_reduce_in_fp32: bool = True):
    """megatron's FullParamLayout for DDP(full_param_layout=...): the params grouped into buffers
    as megatron groups them, the dense buffer laid out by `dense`, the expert one by `expert`."""
    from megatron.core.distributed.param_and_grad_buffer import group_params_for_buffers
    from megatron.core.optimizer.param_layout import FullParamLayout

    named = list(params.items() if isinstance(params, Mapping) else params)
    name_of = {id(p): n for n, p in named}
    layouts, kinds = {}, set()
    for key, (group, indices) in group_params_for_buffers([p for _, p in named],
                                                          grad_reduce_in_fp32).items():
        kind = "expert" if key.is_expert_parallel else "dense"
        plan = expert if key.is_expert_parallel else dense
        if plan is None:
            raise ValueError(f"to_full_param_layout: {kind} parameters but no {kind} plan")
        if kind in kinds:
            raise ValueError(f"to_full_param_layout: {kind} parameters fall into several buffers "
                             f"(dtypes); plan each buffer separately")
        kinds.add(kind)
        layouts[key] = to_megatron_layout(plan, [(name_of[id(p)], p) for p in group],
                                          param_indices=indices)
    return FullParamLayout(layouts=layouts)
