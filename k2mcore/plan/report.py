"""k2m-plan's tables: one plan, or the ranked layouts of --search."""
from __future__ import annotations

from k2mcore.config.schema import K2Config

from .planner import GIB, KINDS, Plan, PlanOptions, SweepRow, stopping_term
from .timing import ASSUMPTIONS


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g}"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def layout_line(plan: Plan) -> str:
    L = plan.layout
    vpp = L.vpp if L.vpp is not None else "-"
    return (f"TP={L.tp} PP={L.pp} VPP={vpp} EP={L.ep} ETP={L.etp} CP={L.cp} DP={L.dp} "
            f"expert-DP={L.expert_dp} SP={'on' if L.sp else 'off'}")


def _merge(rows: list[tuple]) -> list[tuple]:
    """Neighbouring stages with identical figures as one row `pp1-14`."""
    out: list[tuple] = []
    for r, cells in rows:
        if out and out[-1][1] == cells:
            out[-1] = ((out[-1][0][0], r), cells)
        else:
            out.append(((r, r), cells))
    return [((f"{a}" if a == b else f"{a}-{b}"), cells) for (a, b), cells in out]


def text(plan: Plan) -> str:
    o, L = plan.options, plan.layout
    nodes = -(-L.world_size // o.links.gpus_per_node)
    lines = [
        f"plan: {plan.config} on {L.world_size} GPUs ({nodes} nodes of {o.links.gpus_per_node}), "
        f"{o.gpu_mem_gib:g} GiB each, budget {o.budget_bytes / GIB:.1f} GiB "
        f"({o.headroom:.0%} headroom); {o.device}: "
        + ("bf16 weights, TE fused attention" if o.device == "gpu" else "local attention"),
        f"layout: {layout_line(plan)}; {L.num_microbatches} microbatches per step and DP rank",
        f"layers per stage: {L.describe_stages()}",
        "",
        "memory per GPU, heaviest rank of each pipeline stage (GiB; params in elements):",
        f"  {'pp':>6} {'params':>7} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
        f"{'total':>8}  fits",
    ]
    rows = [(s.pp_rank, (_count(s.params), _gib(s.param_bytes), _gib(s.grad_bytes),
                         _gib(s.optimizer_bytes), _gib(s.activation_bytes), _gib(s.total_bytes),
                         "yes" if s.total_bytes <= o.budget_bytes else "NO"))
            for s in plan.stages]
    for name, c in _merge(rows):
        lines.append(f"  {name:>6} {c[0]:>7} {c[1]:>8} {c[2]:>8} {c[3]:>8} {c[4]:>8} "
                     f"{c[5]:>8}  {c[6]}")
    st = plan.step
    comm = "  ".join(f"{k} {_gb(plan.comm.get(k, 0))}/{_gb(plan.comm_bus.get(k, 0))}"
                     for k in KINDS)
    lines += [
        "",
        f"communication per step, busiest rank ({plan.comm_rank}), GB handed to collectives / "
        f"bus GB: {comm}",
        f"ideal step time: {st.total_s:.3g} s = compute {st.compute_s:.3g} s (bubble "
        f"{st.bubble_s:.3g} s) + Newton-Schulz {st.ns_s:.3g} s + "
        + " + ".join(f"{k} {st.comm_s.get(k, 0):.3g} s ({st.links.get(k, '-')})" for k in KINDS
                     if plan.comm.get(k)),
        f"  at {o.links.peak_tflops:g} TFLOP/s, NVLink {o.links.nvlink_gbps:g} GB/s, "
        f"InfiniBand {o.links.ib_gbps:g} GB/s per GPU",
    ]
    if plan.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in plan.warnings]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in ASSUMPTIONS]
    peak = plan.peak_bytes
    lines += ["", f"{'FITS' if plan.fits else 'DOES NOT FIT'}: peak {peak / GIB:.1f} GiB of "
                  f"{o.budget_bytes / GIB:.1f} GiB"]
    return "\n".join(lines)


def search_table(cfg: K2Config, world_size: int, options: PlanOptions, plans: list,
                 considered: int, screened: int) -> str:
    lines = [f"search: {cfg.model.name} on {world_size} GPUs of {options.gpu_mem_gib:g} GiB "
             f"(budget {options.budget_bytes / GIB:.1f} GiB): {considered} valid layouts, "
             f"{screened} fit by the closed-form screen; the best {len(plans)} planned exactly",
             f"  {'#':>2} {'step s':>8} {'peak GiB':>8} {'act GiB':>7} {'tp GB':>7} {'ep GB':>7} "
             f"{'pp GB':>7} {'dp GB':>7} {'cp GB':>7}  layout / recompute (GB: bus bytes per "
             f"step)"]
    for i, p in enumerate(plans, 1):
        worst = max(p.stages, key=lambda s: s.total_bytes)
        lines.append(
            f"  {i:>2} {p.step.total_s:>8.3g} {p.peak_bytes / GIB:>8.1f} "
            f"{worst.activation_bytes / GIB:>7.1f} {_gb(p.comm_bus['tp']):>7} "
            f"{_gb(p.comm_bus['ep']):>7} {_gb(p.comm_bus['pp']):>7} {_gb(p.comm_bus['dp']):>7} "
            f"{_gb(p.comm_bus['cp']):>7}  "
            f"{layout_line(p)} "
            f"recompute={p.recompute}")
    if not plans:
        lines.append("  no layout fits: raise --gpu-mem-gb or the world size, or lower "
                     "train.micro_batch_size / train.seq_length")
    return "\n".join(lines)


def cp_sweep_table(cfg: K2Config, options: PlanOptions, rows: list[SweepRow]) -> str:
    """Memory per rank at each CP degree, and the smallest that fits (or what stops it)."""
    first = next((r.plan for r in rows if r.plan is not None), None)
    lines = [f"cp sweep: {cfg.model.name}, {cfg.train.seq_length} tokens per sequence, "
             f"{options.gpu_mem_gib:g} GiB GPUs (budget {options.budget_bytes / GIB:.1f} GiB), "
             f"{options.attention} attention, other sizes as configured"
             + (f" ({layout_line(first)})" if first else ""),
             f"  {'cp':>3} {'world':>6} {'peak GiB':>8} {'state GiB':>9} {'act GiB':>8} "
             f"{'cp GB':>7} {'step s':>8}  fits"]
    fitting = None
    for r in rows:
        if r.plan is None:
            lines.append(f"  {r.cp:>3} {r.world_size:>6}  {r.error}")
            continue
        p = r.plan
        worst = max(p.stages, key=lambda s: s.total_bytes)
        lines.append(f"  {r.cp:>3} {r.world_size:>6} {p.peak_bytes / GIB:>8.1f} "
                     f"{(worst.total_bytes - worst.activation_bytes) / GIB:>9.1f} "
                     f"{worst.activation_bytes / GIB:>8.1f} {_gb(p.comm_bus['cp']):>7} "
                     f"{p.step.total_s:>8.3g}  {'yes' if p.fits else 'no'}")
        if p.fits and fitting is None:
            fitting = r.cp
    last = next((r.plan for r in reversed(rows) if r.plan is not None), None)
    if fitting is not None:
        lines.append(f"smallest CP that fits: {fitting}")
    elif last is not None:
        lines.append(f"no CP up to {rows[-1].cp} fits: {stopping_term(last)}")
    return "\n".join(lines)
