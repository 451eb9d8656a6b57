"""Newton-Schulz offload: a few NS jobs run by another rank of their pipeline stage, so that no
rank carries much more NS work than the stage's mean.

Owner-aligned shards (shard_plan.py) put each Muon matrix's NS where its reduced gradient lies,
which moves nothing. But a rank's experts cannot leave its expert-DP group: at expert-DP 1 every
rank of a stage runs NS on all its own experts, and the rank that also owns a large dense matrix
(K2's attention output projection, or the first layer's dense MLP) is the busiest by that
matrix's whole cost. No owner choice avoids it (StagePlan.balance's group bound). Sending a few
of that rank's expert matrices to the least loaded ranks of the stage and their NS output back
does, for a bounded number of bytes: K2's expert matrices are small next to the buffers the
ZeRO-1 collectives carry, so a budget of 1.5% of the stage's ZeRO-1 bytes is enough at every DP.
A job is one row block NS orthogonalizes on its own: the gate or the up half of a fused SwiGLU
fc1 (split_gated), so the first layer's dense MLP can spread over two ranks as well.

`plan_offload` is pure python and deterministic: every rank of a stage computes the same list.
Only TP = ETP = CP = 1 (K2's layout): with tensor parallelism a matrix's NS already spans ranks.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass

from .shard_plan import StagePlan


@dataclass(frozen=True)
class Offload:
    """One Newton-Schulz job -- half `half` of the `halves` row blocks of Muon matrix `name`
    (chunk `chunk`; an expert matrix of EP rank `ep`, or a dense one) -- planned on its owner,
    global rank `holder`, and run by `helper` instead: the holder sends that block of its Nesterov
    input, the helper returns the unscaled NS output. A fused SwiGLU fc1 is two jobs (gate, up)."""

    chunk: int
    expert: bool
    ep: int  # 0 for a dense matrix
    name: str
    half: int
    halves: int
    shape: tuple  # the block NS sees (rows / halves, cols)
    cost: int
    holder: int
    helper: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _jobs(stage: StagePlan) -> dict:
    """global rank -> the NS jobs it owns (helper -1), every row block of every Muon matrix."""
    held: dict = {r: [] for r in stage.loads}
    dense_index = stage.dense_index()
    for v, chunk in enumerate(stage.chunks):
        plans = [(False, 0, chunk.dense, dense_index)]
        plans += [(True, e, p, stage.expert_index(e)) for e, p in enumerate(chunk.experts)]
        for expert, e, plan, index in plans:
            for name, owner in plan.owner.items():
                shape, k = plan.shapes[name]
                rows, cols = shape[-2], shape[-1]
                if len(shape) != 2:
                    continue  # a 3-D expert stack is not offloaded
                for h in range(k):
                    held[index[owner][0]].append(Offload(
                        v, expert, e, name, h, k, (rows // k, cols), plan.costs[name] // k,
                        index[owner][0], -1))
    return held


TOLERANCES = (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20)  # targets tried in turn until one fits the byte budget


def plan_offload(stage: StagePlan, *, budget_bytes: int, wire_bytes: int) -> StagePlan:
    """`stage` with `offloads` and the loads after them, or `stage` itself when no plan within
    `budget_bytes` (sent both ways, all ranks) lowers its busiest rank.

    For a target T = (1 + tol) x max(mean, largest NS job), tol from TOLERANCES in turn: every
    rank above T gives up its own jobs (the largest one that does not take it below T, else the
    smallest that brings it to T) into a pool; pool jobs, largest first, go to the least loaded
    other rank, which in turn gives up its own jobs if that lifts it above T. A job moves at most
    once, so this ends; the first plan within the budget is kept."""
    if budget_bytes < 0 or wire_bytes < 1:
        raise ValueError(f"plan_offload: budget_bytes must be >= 0 and wire_bytes >= 1, got "
                         f"{budget_bytes!r}, {wire_bytes!r}")
    w = stage.world
    if budget_bytes == 0 or w.tp != 1 or w.etp != 1 or w.cp != 1 or len(stage.loads) < 2:
        return stage
    bound = stage.balance()["lower_bound"]
    for tol in TOLERANCES:
        loads, moves = _rebalance(stage, (1 + tol) * bound)
        if not moves or max(loads.values()) >= max(stage.loads.values()):
            continue
        if sum(2 * m.numel * wire_bytes for m in moves) <= budget_bytes:
            moves.sort(key=lambda m: (m.holder, m.chunk, m.expert, m.name, m.half))
            return dataclasses.replace(stage, loads=loads, offloads=stage.offloads + moves)
    return stage


def _rebalance(stage: StagePlan, target: float) -> tuple[dict, list]:
    loads = dict(stage.loads)
    home = _jobs(stage)  # jobs still on their owner, which may still move
    pool: list = []  # heap of (-cost, tie, job)

    def shed(r: int) -> None:
        while loads[r] > target and home[r]:
            excess = loads[r] - target
            fits = [m for m in home[r] if m.cost <= excess]
            m = (max(fits, key=lambda m: m.cost) if fits
                 else min(home[r], key=lambda m: m.cost))
            home[r].remove(m)
            loads[r] -= m.cost
            heapq.heappush(pool, (-m.cost, len(pool) + len(moves), m))

    moves: list = []
    for r in sorted(loads):
        shed(r)
    while pool:
        _, _, m = heapq.heappop(pool)
        dst = min((r for r in loads if r != m.holder), key=lambda r: (loads[r], r))
        loads[dst] += m.cost
        moves.append(dataclasses.replace(m, helper=dst))
        shed(dst)
    return loads, moves


def offload_bytes(stage: StagePlan, wire_bytes: int) -> int:
    """Bytes the offloads send per step, both ways, summed over the stage's ranks."""
    return sum(2 * m.numel * wire_bytes for m in stage.offloads)
