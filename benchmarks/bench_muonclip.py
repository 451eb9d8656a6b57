"""MuonClip against ZeRO-1 AdamW per parallel layout, and Newton-Schulz against torch.optim.Muon.

    python benchmarks/bench_muonclip.py [--steps 6] [--layouts dp4 ...] [--global-batch 8 32]

Per layout (a widened k2-tiny on gloo ranks, both optimizers built by the trainer's
build_optimizer and stepped on the same batches):
  - Newton-Schulz FLOPs per rank (max and min) and the redundancy factor: their sum over all
    ranks / the model's total (one NS per matrix: target 1.00);
  - bytes handed to torch.distributed collectives over one whole training step (counted at the
    API, tests/harness/comm_bytes.py; handed over, and bus bytes beside), summed over ranks and on
    the busiest rank, for ZeRO-1 AdamW,
    MuonClip on owner-aligned shards (the default) and MuonClip on megatron's equal shards with
    its two all_to_all exchanges ("muon-a2a"); the all_to_all bytes apart (TP gathers only, on
    owner-aligned shards);
  - median optimizer-step and whole-step times (slowest rank) of each, and the analytic
    Newton-Schulz share: NS FLOPs per step over the forward+backward matmul FLOPs of the Muon
    matrices (6 x their elements x tokens, experts at top-k/E). NS work per step is fixed by
    the model; the forward/backward grows with the tokens per step, so the step-time ratio
    falls as the global batch grows (`--global-batch` runs several sizes in one run).
Then, on this CPU, Newton-Schulz for the widened model's matrices: k2mcore's (fp32, batched by
shape) against torch.optim.Muon's step on the same matrices (bf16, one at a time).
Ranks share this machine's cores: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

LAYOUTS = {
    1: {"1rank": {}},
    2: {
        "dp2": {},
        "tp2-sp": {"parallel.tp": 2, "parallel.sp": True},
        "pp2": {"parallel.pp": 2},
        "ep2": {"parallel.ep": 2},
        "tp2-ep2": {"parallel.tp": 2, "parallel.sp": True, "parallel.ep": 2, "parallel.etp": 1},
    },
    4: {"dp4": {}},
    8: {"tp2-pp2-ep2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.ep": 2,
                        "parallel.sp": True}},
}
WIDE = ["model.hidden_size=128", "model.ffn_hidden_size=512", "model.moe_ffn_hidden_size=64",
        "model.kv_lora_rank=64", "model.q_lora_rank=64"]
GLOBAL_BATCH, SEQ = 8, 64


def _batches(vocab: int, step: int, groups, global_batch: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(step)
    data = torch.randint(0, vocab, (global_batch, SEQ + 1), generator=g)
    dp, rank = groups.layout.dp, groups.dp_rank
    mine = data.chunk(dp)[rank]
    return [{"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
            for s in mine]


MODES = {  # name -> optimizer settings
    "adamw": ["optimizer.name=adamw"],
    "muon": ["optimizer.name=muonclip"],  # owner-aligned ZeRO-1 shards (the default)
    "muon-a2a": ["optimizer.name=muonclip", "optimizer.muon.owner_aligned_shards=false"],
}


def _matmul_flops(cfg, tokens: int) -> int:
    """Forward+backward FLOPs of the Muon matrices for `tokens` tokens: 6 x elements x tokens,
    routed experts weighted by top-k / experts (the share of tokens each one sees)."""
    from k2mcore.optim.muonclip.shard_plan import spec_for
    from k2mcore.parallel.param_counts import megatron_param_shapes

    m, total = cfg.model, 0.0
    for name, shape in megatron_param_shapes(m).items():
        if spec_for(name, shape).muon:
            share = m.moe_topk / m.num_experts if ".local_experts." in name else 1.0
            total += 6 * share * math.prod(shape) * tokens
    return int(total)


def _build(overrides: dict, modes: list, global_batch: int) -> dict:
    """One model and optimizer per mode, under one set of process groups (the same layout)."""
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.optim.chain import inner_optimizers
    from k2mcore.parallel.ddp import ddp_param_layout, wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    runs, groups = {}, None
    for mode in modes:
        sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + WIDE + MODES[mode] + [
            f"train.seq_length={SEQ}", "train.dtype=fp32", "optimizer.warmup_iters=0",
            "optimizer.decay_style=constant", "model.measure_max_attn_logit=true"]
        cfg = load_config("k2-tiny", sets)
        if groups is None:
            groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
                                      seed=1)
        chunks = build_model(cfg, groups)
        param_layout = ddp_param_layout(cfg, chunks, groups)
        model = wrap_ddp(chunks, groups, distributed_optimizer=True, param_layout=param_layout)
        opt, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
        runs[mode] = {"cfg": cfg, "groups": groups, "model": model, "opt": opt,
                      "muon": [o for o in inner_optimizers(opt) if hasattr(o, "plan")],
                      "step_s": [], "opt_s": [], "counted": []}
    return runs


def _step(run: dict, step: int, global_batch: int) -> None:
    import torch.distributed as dist

    from harness.comm_bytes import count_collective_bytes
    from k2mcore.training.metrics import attention_report
    from k2mcore.training.step import forward_backward

    cfg, groups, model, opt = run["cfg"], run["groups"], run["model"], run["opt"]
    batches = _batches(cfg.model.vocab_size, step, groups, global_batch)
    dist.barrier()
    bus = Counter()
    with count_collective_bytes(bus=bus) as counts:
        start = time.perf_counter()
        opt.zero_grad()
        forward_backward(model, groups, batches, seq_length=SEQ, micro_batch_size=1)
        dist.barrier()
        before = time.perf_counter()
        opt.step()
        dist.barrier()
        end = time.perf_counter()
        attention_report(cfg, opt, model, groups, stepped=True)
    run["step_s"].append(end - start)
    run["opt_s"].append(end - before)
    run["counted"].append(dict(counts))
    run["bus"] = sum(bus.values())


def _run_layout(overrides: dict, steps: int, global_batch: int) -> dict:
    """Every mode on the same batches, their steps interleaved (adamw, muon, muon-a2a, adamw,
    ...), so drifts in this shared machine's speed fall on all of them alike."""
    runs = _build(overrides, list(MODES), global_batch)
    for step in range(steps):
        for run in runs.values():
            _step(run, step, global_batch)
    warm = slice(2, None)  # first steps allocate state
    out = {}
    for mode, run in runs.items():
        last = run["counted"][-1]  # every step hands over the same bytes
        out[mode] = {"step_s": statistics.median(run["step_s"][warm]),
                     "opt_s": statistics.median(run["opt_s"][warm]),
                     "bytes": sum(last.values()), "bus": run["bus"],
                     "exchange": last.get("all_to_all_single", 0),
                     "ns_flops": sum(o.ns_flops_here for o in run["muon"]),
                     "matmul_flops": _matmul_flops(run["cfg"], global_batch * SEQ)}
    return out


def worker(world: int, steps: int, out: str, names: list, batch: int) -> None:
    import torch.distributed as dist

    rows = {}
    for name, overrides in LAYOUTS[world].items():
        if names and name not in names and world > 1:
            continue
        rows[name] = {}
        results = _run_layout(overrides, steps, batch)
        for mode in MODES:
            mine = results[mode]
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            rows[name][mode] = {
                "step_s": max(r["step_s"] for r in every), "opt_s": max(r["opt_s"] for r in every),
                "bytes": sum(r["bytes"] for r in every), "bus": sum(r["bus"] for r in every),
                "busiest": max(r["bytes"] for r in every), "ranks": len(every),
                "exchange": sum(r["exchange"] for r in every),
                "ns_flops": [r["ns_flops"] for r in every], "matmul_flops": every[0]["matmul_flops"]}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def ns_versus_torch_muon(repeats: int = 3) -> None:
    """Newton-Schulz on the widened model's Muon matrices: ours (fp32, batched by shape)
    against torch.optim.Muon.step on the same matrices (its NS is bf16, per matrix)."""
    import torch

    from k2mcore.optim.muonclip.muon import orthogonalized_update

    torch.manual_seed(0)
    hidden, ffn, moe, heads, lora = 128, 512, 64, 4, 64
    shapes = ([(heads * 24, lora), (lora, hidden), (lora + 8, hidden), (heads * 32, lora),
               (hidden, heads * 16)] * 4 + [(ffn, hidden), (hidden, ffn // 2)]
              + [(2 * moe, hidden), (hidden, moe)] * (8 + 1) * 3 + [(8, hidden)] * 3)
    mats = [torch.randn(s) for s in shapes]
    by_shape: dict = {}
    for m in mats:
        by_shape.setdefault(tuple(m.shape), []).append(m)

    def ours(dtype):
        for group in by_shape.values():
            orthogonalized_update(torch.stack(group), ns_dtype=dtype)

    params = [torch.nn.Parameter(m.clone()) for m in mats]
    muon = torch.optim.Muon(params, lr=0.01, adjust_lr_fn="match_rms_adamw")
    for p, m in zip(params, mats):
        p.grad = m

    def theirs():
        muon.step()

    timings = {}
    for name, fn in (("k2mcore fp32 batched", lambda: ours(torch.float32)),
                     ("k2mcore bf16 batched", lambda: ours(torch.bfloat16)),
                     ("torch.optim.Muon (bf16)", theirs)):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        timings[name] = min(samples)
    base = timings["torch.optim.Muon (bf16)"]
    print(f"\nNewton-Schulz on {len(mats)} CPU matrices ({len(by_shape)} shapes), 1 thread:")
    for name, t in timings.items():
        print(f"  {name:26s} {1e3 * t:8.1f} ms  ({t / base:.2f}x torch.optim.Muon)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layouts", nargs="+", default=[], help="only these (default: all)")
    ap.add_argument("--global-batch", type=int, nargs="+", default=[GLOBAL_BATCH])
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    if args.worker:
        worker(args.worker, args.steps, args.out, args.layouts, args.global_batch[0])
        return

    for batch in args.global_batch:
        report(_collect(args, batch), batch)
    ns_versus_torch_muon()


def _collect(args, batch: int) -> dict:
    from harness.launching import local_command, local_env

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in LAYOUTS:
            if args.layouts and world > 1 and not set(args.layouts) & set(LAYOUTS[world]):
                continue
            out = os.path.join(tmp, f"{world}.json")
            cmd = local_command(world, __file__, [
                "--worker", str(world), "--steps", str(args.steps), "--out", out,
                "--global-batch", str(batch), *(["--layouts", *args.layouts] if args.layouts else [])])
            subprocess.run(cmd, env=local_env(), check=True, capture_output=True)
            with open(out) as f:
                rows.update(json.load(f))
    return rows


def report(rows: dict, batch: int) -> None:
    total = sum(rows["1rank"]["muon"]["ns_flops"])
    share = total / rows["1rank"]["muon"]["matmul_flops"]
    print(f"MuonClip vs ZeRO-1 AdamW, widened k2-tiny ({batch} x {SEQ} tokens per step, "
          f"fp32, gloo), model NS total {total / 1e9:.3f} GFLOP per step = {share:.2f}x the "
          f"Muon matrices' forward+backward matmul FLOPs; bytes: every byte "
          f"handed to a torch.distributed collective over one whole step, summed over ranks "
          f"(MB), and bus bytes (bus MB; docs/testing.md, 'Counting bytes')")
    print(f"{'layout':12s} {'mode':9s} {'NS GFLOP/rank max..min':>23s} {'redund.':>8s} "
          f"{'MB':>8s} {'bytes x':>8s} {'bus MB':>8s} {'busiest x':>9s} {'a2a MB':>7s} "
          f"{'opt ms':>7s} "
          f"{'opt x':>6s} {'step ms':>8s} {'step x':>6s}")
    for name, r in rows.items():
        a = r["adamw"]
        per_rank = a["bytes"] / a["ranks"]
        for mode, m in r.items():
            flops = m["ns_flops"]
            ns = (f"{max(flops) / 1e9:11.3f}..{min(flops) / 1e9:<9.3f} {sum(flops) / total:8.2f}"
                  if mode != "adamw" else f"{'-':>23s} {'-':>8s}")
            ratio = f"{m['bytes'] / a['bytes']:.3f}" if a["bytes"] else "n/a"
            busiest = f"{m['busiest'] / per_rank:.3f}" if per_rank else "n/a"
            print(f"{name:12s} {mode:9s} {ns} {m['bytes'] / 1e6:8.3f} {ratio:>8s} "
                  f"{m['bus'] / 1e6:8.3f} {busiest:>9s} "
                  f"{m['exchange'] / 1e6:7.3f} {1e3 * m['opt_s']:7.1f} {m['opt_s'] / a['opt_s']:6.2f} "
                  f"{1e3 * m['step_s']:8.1f} {m['step_s'] / a['step_s']:6.2f}")
    print()


if __name__ == "__main__":
    main()
