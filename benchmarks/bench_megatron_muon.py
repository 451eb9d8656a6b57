"""megatron-core 0.19.2's own Muon path against k2mcore's MuonClip and ZeRO-1 AdamW, same model.

    pip install -c constraints.txt -e '.[megatron-muon]'   # emerging-optimizers, for megatron's Muon
    python benchmarks/bench_megatron_muon.py [--steps 6]

megatron's path: LayerWiseDistributedOptimizer over emerging-optimizers' TensorParallelMuon, its
shard-aligned layer-wise buffer layout handed to DDP (`full_param_layout`) and a
DistributedOptimizer for the AdamW parameters. It runs on CPU only with bf16 parameters: with
fp32 ones megatron chains a LayerWise optimizer whose config is None (it wraps its Muon in
FP32Optimizer only under bf16) with a DistributedOptimizer and ChainedOptimizer asserts they
share one config. So every optimizer here runs in bf16 (slow on CPU: compare ratios only).

Per layout (widened k2-tiny, 8 x 64 tokens per step, gloo ranks): bytes handed to
torch.distributed collectives over one whole step summed over ranks (tests/harness/comm_bytes.py),
and their bus bytes,
the busiest rank's, and the median whole-step time (slowest rank), each against AdamW of the same
run; "replicas": whether every DP-replicated weight is equal on all DP ranks after the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

WIDE = ["model.hidden_size=128", "model.ffn_hidden_size=512", "model.moe_ffn_hidden_size=64",
        "model.kv_lora_rank=64", "model.q_lora_rank=64"]
GLOBAL_BATCH, SEQ = 8, 64
LAYOUTS = {2: {"dp2": {}, "ep2": {"parallel.ep": 2}}, 4: {"dp4": {}}}
MODES = ("adamw", "k2m-muonclip", "megatron-muon")


def _model(overrides: dict, optimizer: str):
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    cfg = load_config("k2-tiny", [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + WIDE + [
        f"train.seq_length={SEQ}", "train.dtype=bf16", f"optimizer.name={optimizer}",
        "optimizer.warmup_iters=0", "optimizer.decay_style=constant", "qk_clip.enabled=false"])
    groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))), seed=1)
    return cfg, groups, build_model(cfg, groups)


def _megatron_muon(cfg, groups, chunks):
    """megatron's layer-wise Muon, assembled as its own training loop would."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.layer_wise_optimizer import (
        LayerWiseDistributedOptimizer,
        tag_params_for_buffer_routing,
    )
    from megatron.core.utils import get_model_config

    tag_params_for_buffer_routing(chunks)
    config = get_model_config(chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True,
        check_for_nan_in_grad=False)
    lay, model = groups.layout, []
    for i, chunk in enumerate(chunks):
        params = [p for p in chunk.parameters() if p.requires_grad]
        layout = LayerWiseDistributedOptimizer.compute_full_param_layout(
            params, None, lay.dp * lay.cp, ddp_config, expert_data_parallel_world_size=lay.expert_dp)
        model.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                             disable_bucketing=i > 0, full_param_layout=layout))
    config.finalize_model_grads_func = finalize_model_grads
    m = cfg.optimizer.muon
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="muon", lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
        clip_grad=cfg.train.clip_grad, bf16=True, use_distributed_optimizer=True,
        use_layer_wise_distributed_optimizer=True, muon_momentum=m.momentum,
        muon_nesterov=m.nesterov, muon_num_ns_steps=m.ns_steps), model,
        use_gloo_process_groups=False)
    return model, opt


def _run(overrides: dict, mode: str, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from harness.comm_bytes import count_collective_bytes
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import ddp_param_layout, wrap_ddp
    from k2mcore.training.step import forward_backward

    cfg, groups, chunks = _model(overrides, "adamw" if mode == "adamw" else "muonclip")
    if mode == "megatron-muon":
        model, opt = _megatron_muon(cfg, groups, chunks)
    else:
        param_layout = ddp_param_layout(cfg, chunks, groups)
        model = wrap_ddp(chunks, groups, distributed_optimizer=True,
                         param_layout=param_layout)
        opt, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
    gen = torch.Generator().manual_seed(0)
    times, counted = [], {}
    for _ in range(steps):
        data = torch.randint(0, cfg.model.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        mine = data.chunk(groups.layout.dp)[groups.dp_rank]
        batches = [{"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
                   for s in mine]
        dist.barrier()
        bus = Counter()
        with count_collective_bytes(bus=bus) as counts:
            start = time.perf_counter()
            opt.zero_grad()
            forward_backward(model, groups, batches, seq_length=SEQ, micro_batch_size=1)
            opt.step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        counted, bus_bytes = dict(counts), sum(bus.values())
    return {"step_s": statistics.median(times[2:]), "bytes": sum(counted.values()),
            "bus": bus_bytes,
            "by_kind": counted, "replicas_equal": _replicas_equal(model, groups)}


def _replicas_equal(model, groups) -> bool:
    """Whether every dense (DP-replicated) weight is the same on all DP ranks after the steps:
    an optimizer that skipped part of the parameter all-gather would leave them apart."""
    import torch
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum() for chunk in model
                        for p in chunk.module.parameters() if getattr(p, "allreduce", True)])
    every = [torch.zeros_like(sums) for _ in range(dist.get_world_size(groups.dp_group))]
    dist.all_gather(every, sums, group=groups.dp_group)
    return all(torch.equal(e, sums) for e in every)


def worker(world: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    rows: dict = {}
    for name, overrides in LAYOUTS[world].items():
        rows[name] = {}
        for mode in MODES:
            try:
                mine = _run(overrides, mode, steps)
            except Exception as exc:  # megatron's path may refuse a layout: report it
                mine = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            errors = [r["error"] for r in every if "error" in r]
            rows[name][mode] = {"error": errors[0]} if errors else {
                "bytes": sum(r["bytes"] for r in every), "busiest": max(r["bytes"] for r in every),
                "bus": sum(r["bus"] for r in every),
                "ranks": len(every), "step_s": max(r["step_s"] for r in every),
                "replicas_equal": all(r["replicas_equal"] for r in every),
                "by_kind": {k: sum(r["by_kind"].get(k, 0) for r in every)
                            for k in sorted({k for r in every for k in r["by_kind"]})}}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    try:
        import emerging_optimizers  # noqa: F401
    except ImportError:
        print("bench_megatron_muon: megatron's Muon needs emerging-optimizers "
              "(pip install -c constraints.txt -e '.[megatron-muon]'); nothing measured",
              file=sys.stderr)
        raise SystemExit(2)
    from harness.launching import local_command, local_env

    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in LAYOUTS:
            out = os.path.join(tmp, f"{world}.json")
            subprocess.run(local_command(world, __file__, ["--worker", str(world), "--steps",
                                                           str(args.steps), "--out", out]),
                           env=local_env(), check=True, capture_output=True)
            with open(out) as f:
                rows.update(json.load(f))
    print(f"megatron 0.19.2 layer-wise Muon vs k2mcore MuonClip vs ZeRO-1 AdamW, widened k2-tiny, "
          f"bf16, {GLOBAL_BATCH} x {SEQ} tokens per step; bytes handed to collectives per step "
          f"(MB), bus bytes beside (bus MB; docs/testing.md, 'Counting bytes')")
    print(f"{'layout':8s} {'mode':14s} {'MB':>8s} {'bytes x':>8s} {'bus MB':>8s} {'bus x':>6s} "
          f"{'busiest x':>9s} "
          f"{'step ms':>8s} {'step x':>7s} {'replicas':>9s}")
    for name, r in rows.items():
        a = r["adamw"]
        for mode, m in r.items():
            if "error" in m:
                print(f"{name:8s} {mode:14s} refused: {m['error']}")
                continue
            kinds = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in m["by_kind"].items())
            print(f"{name:8s} {mode:14s} {m['bytes'] / 1e6:8.3f} {m['bytes'] / a['bytes']:8.3f} "
                  f"{m['bus'] / 1e6:8.3f} {m['bus'] / a['bus']:6.3f} "
                  f"{m['busiest'] / (a['bytes'] / a['ranks']):9.3f} {1e3 * m['step_s']:8.1f} "
                  f"{m['step_s'] / a['step_s']:7.2f} {str(m['replicas_equal']):>9s}   "
                  f"MB by collective: {kinds}")


if __name__ == "__main__":
    main()
