"""One layout's plan: memory per pipeline rank, communication per step, an ideal step time and
the warnings that matter. Pure python: no process group, no torch device."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from k2mcore.config.schema import K2Config
from k2mcore.parallel.layout import Layout
from k2mcore.parallel.param_counts import megatron_param_shapes

from .activations import activation_bytes
from .comm import KINDS, bus_bytes, comm_bytes
from .state import RankState, param_dtype_bytes, rank_state, stage_chunks, stage_plan
from .timing import ASSUMPTIONS, Links, StepTime, step_time

GIB = 2**30


@dataclass(frozen=True)
class PlanOptions:
    gpu_mem_gib: float = 80.0  # per GPU, GiB as nvidia-smi reports
    headroom: float = 0.10  # kept free: allocator fragmentation, NCCL and CUDA context
    device: str = "gpu"  # gpu: bf16 (train.dtype auto), TE fused attention; cpu: fp32, local path
    links: Links = field(default_factory=Links)
    attention_path: Optional[str] = None  # "fused" | "local"; None: the device's

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_mem_gib * (1 - self.headroom) * GIB)

    @property
    def attention(self) -> str:
        if self.attention_path is not None:
            return self.attention_path
        return "fused" if self.device == "gpu" else "local"


@dataclass(frozen=True)
class StageReport:
    """The heaviest rank of one pipeline stage."""

    pp_rank: int
    rank: int
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    expert_state_bytes: int  # optimizer state of routed experts on that rank


@dataclass
class Plan:
    config: str
    layout: Layout
    options: PlanOptions
    stages: list  # StageReport per pp rank
    comm: dict  # kind -> bytes handed to collectives, the busiest rank's
    comm_rank: int
    step: StepTime
    ns_flops: int
    warnings: list
    recompute: str = "none"
    pipeline_layout: Optional[str] = None
    comm_bus: dict = field(default_factory=dict)  # kind -> bus bytes, the same rank's

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.options.budget_bytes

    def to_json(self) -> dict:
        L = self.layout
        return {
            "config": self.config,
            "world_size": L.world_size,
            "layout": {**L.sizes(), "expert_dp": L.expert_dp,
                       "num_microbatches": L.num_microbatches, "stages": L.describe_stages(),
                       "pipeline_layout": self.pipeline_layout, "recompute": self.recompute},
            "stages": [{k: v for k, v in asdict(s).items() if k != "expert_state_bytes"}
                       for s in self.stages],
            "comm_bytes_per_step": {k: self.comm.get(k, 0) for k in KINDS},
            "comm_bus_bytes_per_step": {k: round(self.comm_bus.get(k, 0)) for k in KINDS},
            "comm_rank": self.comm_rank,
            "step_time_s": {"total": self.step.total_s, "compute": self.step.compute_s,
                            "bubble": self.step.bubble_s, "newton_schulz": self.step.ns_s,
                            "comm": self.step.comm_s, "links": self.step.links},
            "gpu_mem_bytes": int(self.options.gpu_mem_gib * GIB),
            "budget_bytes": self.options.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
            "warnings": list(self.warnings),
            "assumptions": list(ASSUMPTIONS),
        }


def make_plan(cfg: K2Config, layout: Layout, options: Optional[PlanOptions] = None) -> Plan:
    """The plan of `cfg` on `layout` (resolved by k2mcore.parallel.layout.resolve_layout)."""
    o = options or PlanOptions()
    shapes = megatron_param_shapes(cfg.model)
    act_bytes = param_dtype_bytes(cfg, o.device)  # activations in the training dtype
    acts = activation_bytes(cfg, layout, attention=o.attention, dtype_bytes=act_bytes)
    stages, comm_best, ns = [], (None, -1, {}, None), 0
    per = layout.world_size // layout.pp
    cache: dict = {}  # stages of the same structure (most middle stages) plan alike
    for r in range(layout.pp):
        key = _signature(cfg, layout, r)
        if key not in cache:
            plan = stage_plan(cfg, layout, r, shapes)
            specs = [s for c in stage_chunks(cfg, layout, r, shapes)
                     for s in list(c.dense) + [x for e in c.experts for x in e]]
            muon = {s.name for s in specs if s.muon}
            states = [rank_state(cfg, plan, q, muon, device=o.device)
                      for q in range(r * per, (r + 1) * per)]
            worst: RankState = max(states, key=lambda s: s.total)
            cache[key] = (r, plan, worst)
        first, plan, worst = cache[key]
        shift = (r - first) * per
        a = acts[r].total
        stages.append(StageReport(
            pp_rank=r, rank=worst.rank + shift, params=worst.params,
            param_bytes=worst.param_bytes, grad_bytes=worst.grad_bytes,
            optimizer_bytes=worst.optimizer_bytes, activation_bytes=a,
            total_bytes=worst.total + a, expert_state_bytes=worst.expert_optimizer_bytes))
        ns = max([ns] + list(plan.loads.values()))
        for q in range(r * per, (r + 1) * per):  # plan.buffers_of reads q's DP/EP coordinates
            bus = rank_comm(cfg, layout, q, plan, act_bytes, bus=True)
            if sum(bus.values()) > comm_best[1]:  # the busiest by bus bytes: what takes time
                comm_best = (q, sum(bus.values()), bus, plan)
    q, _, bus, plan = comm_best
    comm = rank_comm(cfg, layout, q, plan, act_bytes)
    comm_bus = {k: bus.get(k, 0) for k in KINDS}
    step = step_time(cfg, layout, comm_bus, o.links, ns_flops=ns)
    p = Plan(config=cfg.model.name, layout=layout, options=o, stages=stages,
             comm={k: comm.get(k, 0) for k in KINDS}, comm_rank=q, step=step, ns_flops=ns,
             warnings=[], recompute=cfg.train.recompute,
             pipeline_layout=cfg.parallel.pipeline_layout, comm_bus=comm_bus)
    p.warnings.extend(warnings_for(cfg, p))
    return p


def coords(layout: Layout, rank: int) -> dict:
    """A global rank's (pp, tp, ep, dp) in megatron's order tp-cp-ep-dp-pp (dense ranks
    tp-cp-dp-pp, expert ranks etp-ep-edp-pp; tp fastest)."""
    per = layout.world_size // layout.pp
    local = rank % per
    return {"pp": rank // per, "tp": local % layout.tp,
            "dp": local // (layout.tp * layout.cp) % layout.dp,
            "ep": local // layout.etp % layout.ep}


def rank_comm(cfg: K2Config, layout: Layout, rank: int, plan: Any, dtype_bytes: int, *,
              bus: bool = False) -> dict:
    """comm_bytes (`bus`: bus_bytes) of one rank, its DP traffic from the stage's planned
    buffers: each buffer's fp32 gradient reduce-scatter and its shard's parameter all-gather (an
    all-reduce of the unpadded buffer, nothing gathered, without the distributed optimizer)."""
    zero1 = cfg.parallel.distributed_optimizer
    buffers = []
    dense_ids = {id(c.dense) for c in plan.chunks}
    for buf, g in plan.buffers_of(rank):
        size = (layout.dp * layout.cp) if id(buf) in dense_ids else layout.expert_dp
        buffers.append((buf.numel, buf.shard_numel[g] if zero1 else 0, size))
    return (bus_bytes if bus else comm_bytes)(cfg, layout, rank=coords(layout, rank),
                                              dp_buffers=buffers, dtype_bytes=dtype_bytes)


def _signature(cfg: K2Config, layout: Layout, pp_rank: int) -> tuple:
    """What a stage's buffers depend on: per chunk, embedding/loss and each layer's kind."""
    k = cfg.model.first_k_dense
    return tuple(("E" in text, "L" in text,
                  tuple(i >= k for i in layout.layer_ids(pp_rank, v)))
                 for v, text in enumerate(layout.stages[pp_rank]))


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def warnings_for(cfg: K2Config, p: Plan) -> list[str]:
    """The few findings a user must act on before spending GPU hours."""
    L, out = p.layout, []
    opt = "MuonClip" if cfg.optimizer.name == "muonclip" else "AdamW"
    worst = max(p.stages, key=lambda s: s.total_bytes)
    if L.expert_dp == 1 and cfg.model.first_k_dense < cfg.model.num_layers and L.world_size > 1:
        heavy = max(p.stages, key=lambda s: s.expert_state_bytes)
        out.append(f"optimizer state of experts is not sharded (expert-DP = 1): "
                   f"{_gb(heavy.expert_state_bytes)} per rank with {opt}")
    if not cfg.parallel.distributed_optimizer and L.dp > 1:
        out.append(f"parallel.distributed_optimizer=false: every DP rank holds the whole "
                   f"optimizer state ({_gb(worst.optimizer_bytes)} on pp rank {worst.pp_rank})")
    if not p.fits:
        terms = {"parameters": worst.param_bytes, "gradient buffers": worst.grad_bytes,
                 "optimizer state": worst.optimizer_bytes, "activations": worst.activation_bytes}
        big = max(terms, key=terms.get)
        over = worst.total_bytes - p.options.budget_bytes
        out.append(f"does not fit: pp rank {worst.pp_rank} needs {worst.total_bytes / GIB:.1f} "
                   f"GiB, {over / GIB:.1f} GiB over the {p.options.budget_bytes / GIB:.1f} GiB "
                   f"budget ({p.options.gpu_mem_gib:g} GiB less {p.options.headroom:.0%} "
                   f"headroom); largest term: {big} {terms[big] / GIB:.1f} GiB")
    if L.pp > 1:
        share = p.step.bubble_s / max(p.step.compute_s, 1e-30)
        if share > 0.2:
            out.append(f"pipeline bubble is {share:.0%} of compute: raise the micro-batches per "
                       f"step ({L.num_microbatches}) or parallel.vpp")
    if L.tp > p.options.links.gpus_per_node:
        out.append(f"parallel.tp={L.tp} spans nodes of {p.options.links.gpus_per_node} GPUs: "
                   f"its per-layer collectives cross InfiniBand")
    if p.step.links.get("ep") == "ib" and p.comm.get("ep"):
        out.append(f"expert all-to-alls cross nodes (etp*ep = {L.etp * L.ep} > "
                   f"{p.options.links.gpus_per_node} GPUs per node)")
    return out


#: the context-parallel degrees `k2m-plan --cp-sweep` plans
SWEEP_CP = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class SweepRow:
    cp: int
    world_size: int
    plan: Optional[Plan]
    error: str = ""  # the layout's one-line error, when it does not resolve


def cp_sweep(cfg: K2Config, world_size: int, options: Optional[PlanOptions] = None,
             degrees: tuple = SWEEP_CP) -> list[SweepRow]:
    """The config's layout at each CP degree, every other size kept (tp, pp, ep, etp, dp, the
    batch): the world grows with cp. `world_size` is the config's world at its own cp."""
    import copy

    from k2mcore.errors import ConfigError
    from k2mcore.parallel.layout import resolve_layout

    base = cfg.parallel.cp
    if world_size % base:
        raise ConfigError(f"--world-size {world_size} is not a multiple of parallel.cp={base}")
    rows = []
    for cp in degrees:
        c = copy.deepcopy(cfg)
        c.parallel.cp = cp
        world = world_size // base * cp
        try:
            rows.append(SweepRow(cp, world, make_plan(c, resolve_layout(c, world), options)))
        except ConfigError as exc:
            rows.append(SweepRow(cp, world, None, str(exc)))
    return rows


def stopping_term(plan: Plan) -> str:
    """What keeps the heaviest rank over the budget: its model state alone, or the
    activations on top of it."""
    worst = max(plan.stages, key=lambda s: s.total_bytes)
    state = worst.total_bytes - worst.activation_bytes
    budget = plan.options.budget_bytes
    if state > budget:
        return (f"model state alone (weights, gradients, optimizer state: {_gib(state)} on "
                f"pp rank {worst.pp_rank}) exceeds the {_gib(budget)} budget")
    return (f"activations ({_gib(worst.activation_bytes)} on pp rank {worst.pp_rank}) on top "
            f"of {_gib(state)} of model state exceed the {_gib(budget)} budget")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
