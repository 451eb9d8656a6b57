"""Bytes handed to torch.distributed collectives, counted at the API while a block runs (the
tests and, through tests/ on sys.path, the benchmarks).

Two conventions, both per rank and summed over ranks by the caller (docs/testing.md, 'Counting
bytes'):
- handed over (the counter's Counter, and the planner's k2mcore.plan.comm): what this rank gives
  the collective. A reduce-scatter or an all-reduce counts its whole input, an all-gather its
  local shard, an all-to-all what it sends (its own split included), a broadcast the source's
  tensor, a point-to-point send what it sends.
- bus bytes (`bus=`, NCCL-tests' convention: what a bandwidth-optimal algorithm moves over each
  rank's link): a reduce-scatter N_in(d-1)/d, an all-gather N_out(d-1)/d, an all-reduce
  2N(d-1)/d, an all-to-all what goes to the other ranks, a broadcast N on every rank, a send N.
  A ZeRO-1 step's gradient reduce-scatter and parameter all-gather have equal bus bytes.
A collective over a group of one rank counts nothing in either. megatron's gradient buffers and
its tensor-parallel layers and mappings call the collectives through names they bound at import
(`dist_all_gather_func`, `dist_reduce_scatter_func`); those are wrapped too. A collective that
calls another (an adapter, e.g. the CPU backend's uneven all_gather) is counted once, at the
outermost call, as the collective the caller asked for.

`count_collective_bytes(by_kind=True)` counts by kind instead ("tp", "ep", "pp", "dp", "cp",
"optimizer", the planner's k2mcore.plan.comm breakdown): each collective by the megatron
parallel_state group it runs on (`GROUP_KINDS`), point-to-point sends (isend/send, also inside
batch_isend_irecv) as the bytes sent, and everything inside `scope(kind)` (MuonClip's inner
step, which the by-kind counter wraps itself, and whatever the caller wraps, e.g. the attention
report) as that kind. A group that is none of parallel_state's is counted as "other".
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


# op name -> (position, keyword) of what this rank hands over, and position of the group
_INPUTS: dict[str, tuple[int, str, int]] = {
    "all_reduce": (0, "tensor", 2),
    "reduce_scatter_tensor": (1, "input", 3),
    "_reduce_scatter_base": (1, "input", 3),
    "reduce_scatter": (1, "input_list", 3),
    "all_gather_into_tensor": (1, "input_tensor", 2),
    "_all_gather_base": (1, "input_tensor", 2),
    "all_gather": (1, "tensor", 2),
    "all_to_all_single": (1, "input", 4),
    "all_to_all": (1, "input_tensor_list", 2),
    "broadcast": (0, "tensor", 2),
}


# op name -> (position, keyword) of the output, for the bus bytes of gathers
_OUTPUTS: dict[str, tuple[int, str]] = {
    "all_gather_into_tensor": (0, "output_tensor"), "_all_gather_base": (0, "output_tensor"),
    "all_gather": (0, "tensor_list"),
}


def _bus_bytes(name: str, handed: Any, args: tuple, kwargs: dict, group: Any) -> float:
    """NCCL-tests' bus bytes of one call on this rank (module docstring)."""
    d = dist.get_world_size(group)
    share = (d - 1) / d
    if name in ("isend", "send", "broadcast"):
        return float(_nbytes(handed))
    if name == "all_reduce":
        return 2 * share * _nbytes(handed)
    if name in _OUTPUTS:
        pos, key = _OUTPUTS[name]
        return share * _nbytes(kwargs.get(key, args[pos] if len(args) > pos else None))
    if name == "all_to_all":  # every input but the one this rank keeps
        me = dist.get_rank(group)
        return float(sum(_nbytes(t) for i, t in enumerate(handed) if i != me))
    if name == "all_to_all_single":
        splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
        total = _nbytes(handed)
        if splits is None or len(splits) == 0:
            return share * total
        splits = [int(x) for x in splits]
        own = splits[dist.get_rank(group)]
        return total * (1 - own / sum(splits)) if sum(splits) else 0.0
    return share * _nbytes(handed)  # reduce-scatters: the whole input


# point-to-point sends: (position, keyword) of the tensor, position of the group
_SENDS: dict[str, tuple[int, str, int]] = {"isend": (0, "tensor", 2), "send": (0, "tensor", 2)}

# parallel_state getter (keyword arguments) -> kind, first match wins (some getters can return
# the same group object: the first listed names it)
GROUP_KINDS: list[tuple[str, dict, str]] = [
    ("get_tensor_model_parallel_group", {}, "tp"),
    ("get_expert_tensor_parallel_group", {}, "tp"),  # the MoE dispatcher's TP gather/scatter
    ("get_expert_model_parallel_group", {}, "ep"),
    ("get_expert_tensor_and_model_parallel_group", {}, "ep"),  # tokens-per-expert exchange
    ("get_pipeline_model_parallel_group", {}, "pp"),
    ("get_embedding_group", {}, "pp"),
    ("get_data_parallel_group", {}, "dp"),
    ("get_data_parallel_group", {"with_context_parallel": True}, "dp"),
    ("get_expert_data_parallel_group", {}, "dp"),
    ("get_intra_distributed_optimizer_instance_group", {}, "dp"),
    # the router's expert-bias token counts (megatron moe_utils.get_updated_expert_bias)
    ("get_tensor_and_data_parallel_group", {"with_context_parallel": True}, "dp"),
    ("get_model_parallel_group", {}, "dp"),  # megatron's grad-norm / found-inf reductions
    # MLA's latent all-gather over CP (and its reduce-scatter in backward); last, so a group
    # built elsewhere with the same ranks as the CP group (DDP's DP x CP at dp 1) stays "dp"
    ("get_context_parallel_group", {}, "cp"),
]

_SCOPE: list = []  # innermost attribution last


@contextlib.contextmanager
def scope(kind: str) -> Iterator[None]:
    """Everything counted by kind inside the block counts as `kind` (outermost scope wins)."""
    _SCOPE.append(kind)
    try:
        yield
    finally:
        _SCOPE.pop()


def _group_kinds() -> list[tuple[Any, str]]:
    from megatron.core import parallel_state as ps

    out = []
    for getter, kw, kind in GROUP_KINDS:
        g = None
        for extra in ({"check_initialized": False}, {}):
            try:
                g = getattr(ps, getter)(**extra, **kw)
                break
            except TypeError:
                continue
            except (AssertionError, AttributeError, RuntimeError):
                break
        if g is not None:
            out.append((g, kind))
    return out


def _ranks(group: Any) -> tuple:
    return tuple(dist.get_process_group_ranks(group))


def _classify(group: Any, groups: list) -> str:
    if _SCOPE:
        return _SCOPE[0]
    if group is None or group is dist.group.WORLD:
        return "world"
    for g, kind in groups:
        if g is group:
            return kind
    # a group megatron built elsewhere (DDP's, the optimizer's): named by the first of
    # parallel_state's groups with the same ranks
    ranks = _ranks(group)
    for g, kind in groups:
        if _ranks(g) == ranks:
            return kind
    return "other"


def _call_site() -> str:
    """The innermost megatron/k2mcore frames outside the collectives' adapters (for logs)."""
    import traceback

    names = []
    for f in reversed(traceback.extract_stack()[:-3]):
        if ("megatron" in f.filename or "k2mcore" in f.filename) and "compat" not in f.filename:
            names.append(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}")
            if len(names) == 3:
                break
    return "<".join(names)


def _wrap(name: str, fn: Callable, counts: Counter, depth: list, kinds: Optional[list] = None,
          log: Optional[list] = None, table: Optional[dict] = None,
          kind: Optional[str] = None, bus: Optional[Counter] = None) -> Callable:
    pos, key, group_pos = (table or _INPUTS)[name]

    def counted(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group", args[group_pos] if len(args) > group_pos else None)
        # the outermost call only (a wrapper calling another collective counts once), and only
        # over a group of several ranks (a 1-rank group's bytes never leave the rank)
        if depth[0] == 0 and dist.get_world_size(group) > 1:
            handed = kwargs.get(key, args[pos] if len(args) > pos else None)
            if name == "broadcast":
                src = kwargs.get("src", args[1] if len(args) > 1 else None)
                if src is None:  # group_src: a rank within the group
                    src = dist.get_global_rank(group or dist.group.WORLD,
                                               kwargs.get("group_src") or 0)
                bus_of = _bus_bytes(name, handed, args, kwargs, group)
                if dist.get_rank() != src:
                    handed = None  # only the source hands its tensor over (src is a global rank)
            else:
                bus_of = _bus_bytes(name, handed, args, kwargs, group)
            nbytes = _nbytes(handed)
            label = name if kinds is None else (
                _SCOPE[0] if _SCOPE else kind or _classify(group, kinds))
            counts[label] += nbytes
            if bus is not None:
                bus[label] += bus_of
            if log is not None:
                log.append((label, name, nbytes, tuple(getattr(handed, "shape", ())),
                            _call_site(), bus_of))
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1

    counted.__wrapped__ = fn  # type: ignore[attr-defined]
    return counted


@contextlib.contextmanager
def count_collective_bytes(by_kind: bool = False, log: Optional[list] = None,
                           bus: Optional[Counter] = None) -> Iterator[Counter]:
    """Yields a Counter {collective: bytes this rank handed over} filled while the block runs.

    `by_kind`: {kind: bytes} instead (module docstring), point-to-point sends included.
    `log`: a list that gets (label, op, bytes, shape, call site, bus bytes) per counted call.
    `bus`: a Counter that gets the same labels' bus bytes (floats: (d-1)/d is not whole)."""
    from megatron.core.distributed import param_and_grad_buffer as pgb
    from torch.distributed import distributed_c10d as c10d

    counts: Counter = Counter()
    depth = [0]
    kinds = _group_kinds() if by_kind else None
    # (owner, attribute, what it is counted as)
    targets = [(dist, name, name) for name in _INPUTS if hasattr(dist, name)]
    targets += [(pgb, "dist_all_gather_func", "all_gather_into_tensor"),
                (pgb, "dist_reduce_scatter_func", "reduce_scatter_tensor")]
    # tensor parallelism's sequence-parallel gathers and scatters (megatron.core.tensor_parallel
    # binds them at import too)
    from megatron.core.tensor_parallel import layers as tpl
    from megatron.core.tensor_parallel import mappings as tpm

    targets += [(owner, attr, as_name) for owner in (tpm, tpl)
                for attr, as_name in (("dist_all_gather_func", "all_gather_into_tensor"),
                                      ("dist_reduce_scatter_func", "reduce_scatter_tensor"))
                if hasattr(owner, attr)]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    # the DDP buffers' gradient reduce-scatter and parameter all-gather are data parallel's
    wrappers = [_wrap(as_name, fn, counts, depth, kinds, log,
                      kind="dp" if owner is pgb else None, bus=bus)
                for (owner, _, as_name), (_, _, fn) in zip(targets, saved)]
    if by_kind:
        # p2p: torch.distributed's names and c10d's own (batch_isend_irecv checks `op is isend`
        # against c10d's global, so both must be the same wrapper)
        for name in _SENDS:
            fn = getattr(c10d, name)
            # k2mcore's only point-to-point traffic is the pipeline's
            w = _wrap(name, fn, counts, depth, kinds, log, table=_SENDS, kind="pp", bus=bus)
            for owner in (dist, c10d):
                saved.append((owner, name, getattr(owner, name)))
                targets.append((owner, name, name))
                wrappers.append(w)
        from k2mcore.optim.muonclip.sharded import ShardedMuonClip

        step = ShardedMuonClip.step

        def scoped_step(self, *a, **kw):
            with scope("optimizer"):
                return step(self, *a, **kw)

        saved.append((ShardedMuonClip, "step", step))
        targets.append((ShardedMuonClip, "step", "step"))
        wrappers.append(scoped_step)
    try:
        for (owner, attr, _), w in zip(targets, wrappers):
            setattr(owner, attr, w)
        yield counts
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


STEP_PARTS = ("grad-RS", "param-AG", "muon-x", "ep-a2a", "rest")


def step_part(label: str, op: str) -> str:
    """Which part of a training step a by-kind log entry (label, op) is: the DDP buffers'
    gradient reduce-scatter ("grad-RS") or parameter all-gather ("param-AG"), MuonClip's
    exchange ("muon-x"), the MoE dispatcher's all-to-alls ("ep-a2a"), or the rest."""
    if label == "dp" and op.startswith(("reduce_scatter", "_reduce_scatter")):
        return "grad-RS"
    if label == "dp" and op.startswith(("all_gather", "_all_gather")):
        return "param-AG"
    if label == "optimizer" and op.startswith("all_to_all"):
        return "muon-x"
    if label == "ep" and op.startswith("all_to_all"):
        return "ep-a2a"
    return "rest"


def total_over_ranks(counts: Counter) -> int:
    """Sum of every rank's counted bytes (collective; call outside the counted block)."""
    box = torch.tensor([float(sum(counts.values()))], dtype=torch.float64)
    dist.all_reduce(box)
    return int(round(box.item()))
