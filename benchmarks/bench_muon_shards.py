"""Owner-aligned uneven ZeRO-1 shards (k2mcore.optim.muonclip.shard_plan) on Kimi-K2's shapes,
against ZeRO-1 AdamW, MuonClip's exchange on equal shards and megatron 0.19.2's LayerWise layout. Planning
only.

    python benchmarks/bench_muon_shards.py [--dp 2 4 8 16 64] [--ep 16 64]

kimi-k2 preset split (PP16 x VPP2 "Et|(tt|)*30L", TP1), world 16 * dp. At TP1 megatron needs
world % (ep * pp) == 0, i.e. EP <= DP: a requested EP above DP runs at EP = DP (expert-DP 1),
marked "EP16->8". Per layout, over all 16 pipeline stages and all their ranks:

  pad %      buffer padding / parameters held (every rank's buffers);
  bytes      total collective input bytes over all ranks / ZeRO-1 AdamW's: fp32 gradient
             reduce-scatter (the whole buffer) + bf16 parameter all-gather (the rank's shard);
             ZeRO-1 is megatron's DistributedOptimizer layout (64-element starts, lcm(dp,128)
             end, one bucket per buffer as k2mcore builds DDP), equal shards;
  busiest    worst stage: its busiest rank's bytes / ZeRO-1's per-rank bytes there;
  NS/mean    worst stage: busiest rank's Newton-Schulz FLOPs (dense + expert) / the mean;
  NS/LB      the same against max(largest single NS job, mean) (a fused SwiGLU fc1 is two
             jobs, gate and up, as Newton-Schulz orthogonalizes them apart);
  NS/gLB     the same against the group lower bound of plans that keep every matrix on its
             owner (StagePlan.balance: experts cannot leave their expert-DP group, so at
             expert-DP 1 a rank's own experts are fixed); "off" goes below it;
  state      worst stage: the largest optimizer shard (fp32 master + moments live there) /
             ZeRO-1's shard.

Rows: "zero1" ZeRO-1 AdamW (the baseline); "a2a" MuonClip on megatron's equal ZeRO-1 shards (owner_aligned_shards: false) (NS owners by
LPT per holder group, no loads carried between dense and experts; its two bf16 all_to_alls
added to the bytes); "owner" this plan; "off" this plan with
Newton-Schulz offloads (ns_offload.py, budget optimizer.muon.ns_offload_budget = 1.5% of the
stage's ZeRO-1 bytes; their bf16 all_to_all bytes, both ways, added); "LW-1" megatron's
LayerWiseDistributedOptimizer._compute_per_buffer_param_layout for the Muon params (AdamW params
in their own DistributedOptimizer buffer, as its compute_full_param_layout does), one bucket;
"LW-40M" the same with DDP's default bucket size max(4e7, 1e6 * dp) (k2mcore does not overlap the
reduction, so it builds one bucket). All ratios are against the baseline of the same run.
"""
from __future__ import annotations

import argparse
import heapq
import time
import types

GRAD, PARAM, WIRE = 4, 2, 2  # fp32 grads, bf16 params, bf16 Muon exchange
OFFLOAD_BUDGET = 0.015  # optimizer.muon.ns_offload_budget's default


class _Stand:
    """What megatron's layout functions read of a parameter: .data.nelement()."""

    def __init__(self, n: int):
        self.n, self.data = n, self

    def nelement(self) -> int:
        return self.n


def _megatron_layout(fn, numels, dp, bucket_size=None):
    """(param positions, bucket ranges) of megatron's layout function on stand-ins."""
    stands = [_Stand(n) for n in numels]
    cfg = types.SimpleNamespace(pad_buckets_for_high_nccl_busbw=False)
    layout = fn(stands, bucket_size, dp, cfg)
    return [layout.param_index_map[s][:2] for s in stands], layout.bucket_indices


def _buffer_numel(buckets) -> int:
    return buckets[-1][1] if buckets else 0


def _lpt(costs, size):
    """k2mcore.optim.muonclip.sharded.balance (imported there with torch): LPT, ties by
    index/rank."""
    owner, heap = [0] * len(costs), [(0, r) for r in range(size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner


class Tally:
    """One method's figures over the stages of one layout."""

    def __init__(self):
        self.pad = self.held = self.bytes = self.base = 0
        self.busiest = self.ns_mean = self.ns_lb = self.ns_glb = self.state = 0.0
        self.has_ns = False

    def stage(self, ranks, *, pad, held, bytes_of, base_of, state_of, base_state, bal, ns_of=None):
        b, z = [bytes_of(r) for r in ranks], [base_of(r) for r in ranks]
        self.pad += sum(pad(r) for r in ranks)
        self.held += sum(held(r) for r in ranks)
        self.bytes, self.base = self.bytes + sum(b), self.base + sum(z)
        self.busiest = max(self.busiest, max(b) / max(z))
        self.state = max(self.state, max(state_of(r) for r in ranks) / base_state)
        if ns_of is not None:
            self.has_ns = True
            top = max(ns_of(r) for r in ranks)
            self.ns_mean = max(self.ns_mean, top / bal["mean"])
            self.ns_lb = max(self.ns_lb, top / bal["lower_bound"])
            self.ns_glb = max(self.ns_glb, top / bal["group_lower_bound"])

    def row(self, label, name):
        ns = (f"{self.ns_mean:7.3f} {self.ns_lb:7.3f} {self.ns_glb:7.3f}" if self.has_ns
              else f"{'-':>7} {'-':>7} {'-':>7}")
        return (f"{label:<14} {name:<7} {100 * self.pad / self.held:8.3f} "
                f"{self.bytes / self.base:7.3f} {self.busiest:8.3f} {ns} {self.state:7.3f}")


LW_RUNS = (("LW-1", lambda n: None), ("LW-40M", lambda n: max(40_000_000, 1_000_000 * n)))


def _entry(kind, n, specs, megatron):
    """One buffer (the same for every EP rank of an expert buffer): megatron's ZeRO-1 layout
    and LayerWise layouts with their per-shard NS."""
    dist_opt, layer_wise = megatron
    pos, buckets = _megatron_layout(dist_opt, [s.numel for s in specs], n)
    e = {"kind": kind, "n": n, "held": sum(s.numel for s in specs), "z": _buffer_numel(buckets),
         "jobs": [(s.cost, pos[i], _buffer_numel(buckets)) for i, s in enumerate(specs) if s.muon]}
    muon = [s for s in specs if s.muon]
    adamw = [s.numel for s in specs if not s.muon]
    for label, size in LW_RUNS:
        mpos, mb = _megatron_layout(layer_wise, [s.numel for s in muon], n, size(n))
        total = _buffer_numel(mb) + _buffer_numel(_megatron_layout(dist_opt, adamw, n)[1])
        ns = [0] * n
        for s, (start, _) in zip(muon, mpos):
            lo, hi = next(x for x in mb if x[0] <= start < x[1])
            ns[(start - lo) // ((hi - lo) // n)] += s.cost
        e[label] = (total, ns)
    return e


def _exchange(entries, n):
    """Today's MuonClip on ZeRO-1 shards, one holder group: (bf16 bytes each rank sends in the
    two all_to_alls, NS FLOPs per rank), owners by LPT over all its matrices."""
    jobs = [j for e in entries for j in e["jobs"]]
    sent, ns = [0] * n, [0] * n
    for (cost, (s, e), z), o in zip(jobs, _lpt([c for c, *_ in jobs], n)):
        ns[o] += cost
        shard = z // n
        for r in range(n):
            piece = max(0, min(e, (r + 1) * shard) - max(s, r * shard))
            if r != o:
                sent[r] += WIRE * piece  # the piece to the owner
                sent[o] += WIRE * piece  # and the owner's slice back
    return sent, ns


def bench_layout(dp: int, ep: int, shapes, megatron):
    from k2mcore.config.loader import load_config
    from k2mcore.optim.muonclip.shard_plan import World, plan_stage, stage_chunks_from_shapes
    from k2mcore.parallel.layout import resolve_layout

    cfg = load_config("kimi-k2")
    cfg.parallel.ep = ep
    layout = resolve_layout(cfg, 16 * dp)
    world = World.from_layout(layout)
    from k2mcore.optim.muonclip.ns_offload import plan_offload

    tally = {n: Tally() for n in ("zero1", "a2a", "owner", "off", "LW-1", "LW-40M")}
    zgb = 0.0
    for pp in range(layout.pp):
        chunks = stage_chunks_from_shapes(shapes, layout, pp)
        stage = plan_stage(chunks, world, pp_rank=pp)
        bal = stage.balance()
        where = {}  # global rank -> (dense group rank, expert-DP group rank)
        for d, idx in enumerate(stage.dense_index()):
            for r in idx:
                where[r] = [d, None]
        for e in range(world.ep):
            for j, idx in enumerate(stage.expert_index(e)):
                for r in idx:
                    where[r][1] = j
        entries = []
        for chunk in chunks:
            entries.append(_entry("dense", world.dense_dp, chunk.dense, megatron))
            if chunk.experts:  # every EP rank holds experts of the same shapes
                assert all([s.shape for s in x] == [s.shape for s in chunk.experts[0]]
                           for x in chunk.experts)
                entries.append(_entry("expert", world.expert_dp, chunk.experts[0], megatron))
        planned = [p for ch in stage.chunks for p in [ch.dense, *ch.experts[:1]]]
        assert [e["z"] for e in entries] == [p.zero1_numel for p in planned]  # same baseline
        a2a = {k: _exchange([e for e in entries if e["kind"] == k],
                            world.dense_dp if k == "dense" else world.expert_dp)
               for k in ("dense", "expert")}

        def over(fn):
            """Sum fn(entry, group rank) over the buffers a rank holds."""
            return lambda r: sum(fn(e, where[r][e["kind"] == "expert"]) for e in entries)

        base_of = over(lambda e, g: GRAD * e["z"] + PARAM * e["z"] // e["n"])
        zstate = over(lambda e, g: e["z"] // e["n"])
        base_state = max(zstate(r) for r in stage.ranks)
        held = over(lambda e, g: e["held"])
        zgb = max(zgb, max(base_of(r) for r in stage.ranks) / 1e9)
        common = dict(held=held, base_of=base_of, base_state=base_state, bal=bal)
        zpad = over(lambda e, g: e["z"] - e["held"])
        tally["zero1"].stage(stage.ranks, pad=zpad, bytes_of=base_of, state_of=zstate, **common)
        kinds = ("dense", "expert")
        tally["a2a"].stage(
            stage.ranks, pad=zpad, state_of=zstate, **common,
            bytes_of=lambda r: base_of(r) + sum(a2a[k][0][where[r][i]] for i, k in enumerate(kinds)
                                                if where[r][i] is not None and a2a[k][0]),
            ns_of=lambda r: sum(a2a[k][1][where[r][i]] for i, k in enumerate(kinds)
                                if where[r][i] is not None and a2a[k][1]))
        tally["owner"].stage(
            stage.ranks, pad=lambda r: sum(p.padding for p, _ in stage.buffers_of(r)),
            bytes_of=stage.bytes_of, state_of=stage.state_numel_of, ns_of=stage.loads.__getitem__,
            **common)
        off = plan_offload(stage, wire_bytes=WIRE,
                           budget_bytes=int(OFFLOAD_BUDGET * sum(base_of(r) for r in stage.ranks)))
        sent = {r: sum(WIRE * m.numel for m in off.offloads if r in (m.holder, m.helper))
                for r in stage.ranks}
        tally["off"].stage(
            stage.ranks, pad=lambda r: sum(p.padding for p, _ in stage.buffers_of(r)),
            bytes_of=lambda r: stage.bytes_of(r) + sent[r], state_of=stage.state_numel_of,
            ns_of=off.loads.__getitem__, **common)
        for label, _ in LW_RUNS:
            tally[label].stage(
                stage.ranks, pad=over(lambda e, g, k=label: e[k][0] - e["held"]),
                bytes_of=over(lambda e, g, k=label: GRAD * e[k][0] + PARAM * e[k][0] // e["n"]),
                state_of=over(lambda e, g, k=label: e[k][0] // e["n"]),
                ns_of=over(lambda e, g, k=label: e[k][1][g]), **common)
    return tally, zgb, world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    ap.add_argument("--ep", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    t0 = time.time()
    from k2mcore import compat

    compat.install()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    from k2mcore.config.loader import load_config
    from k2mcore.parallel.param_counts import megatron_param_shapes

    megatron = (DistributedOptimizer._compute_per_buffer_param_layout,
                LayerWiseDistributedOptimizer._compute_per_buffer_param_layout)
    shapes = megatron_param_shapes(load_config("kimi-k2").model)
    runs, seen = [], set()
    for dp in args.dp:
        for ep in args.ep:
            eff = min(ep, dp)
            if (dp, eff) in seen:
                continue
            seen.add((dp, eff))
            runs.append((dp, ep, eff))
    print("kimi-k2 shapes, PP16 x VPP2, TP1, world = 16 * dp; all 16 stages; ratios vs ZeRO-1 "
          "AdamW of the same run")
    head = (f"{'layout':<14} {'method':<7} {'pad %':>8} {'bytes':>7} {'busiest':>8} "
            f"{'NS/mean':>7} {'NS/LB':>7} {'NS/gLB':>7} {'state':>7}")
    print(head)
    print("-" * len(head))
    for dp, ep, eff in runs:
        tally, zgb, world = bench_layout(dp, eff, shapes, megatron)
        name = f"DP{dp} EP{ep}" + (f"->{eff}" if eff != ep else "")
        for i, (method, t) in enumerate(tally.items()):
            print(t.row(name if i == 0 else "", method))
        print(f"{'':<14} (ZeRO-1 busiest rank: {zgb:.1f} GB per step; expert-DP {world.expert_dp})")
    print(f"planned in {time.time() - t0:.1f} s (incl. megatron import)")


if __name__ == "__main__":
    main()
