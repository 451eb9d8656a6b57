"""Forward+backward time per parallel layout for k2-tiny on gloo ranks, and the CPU backend's cost.

    python benchmarks/bench_layouts.py [--steps 10]

Prints one row per layout (median ms per step over the global batch, and the ratio to 1 rank,
all measured in this run) and, on 1 rank, the step time with the CPU backend's device-rewriting
TorchFunctionMode pushed vs popped (the only stand-in that costs per op; the others are
one-off patches). Ranks share the machine's cores: a ratio > 1 is contention, not a
property of the layout on real hardware.
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

LAYOUTS = {
    1: {"1rank": {}},
    2: {
        "tp2-sp": {"parallel.tp": 2, "parallel.sp": True},
        "pp2": {"parallel.pp": 2},
        "pp2-vpp2": {"parallel.pp": 2, "parallel.vpp": 2},
        "ep2": {"parallel.ep": 2},
        "dp2": {},
        "tp2-ep2": {"parallel.tp": 2, "parallel.sp": True, "parallel.ep": 2, "parallel.etp": 1},
    },
    8: {"tp2-pp2-ep2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.ep": 2,
                        "parallel.sp": True}},
}
GLOBAL_BATCH, SEQ = 8, 64


def _time_steps(model, groups, batches, steps: int) -> list[float]:
    from k2mcore.training.step import forward_backward

    times = []
    for _ in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        forward_backward(model, groups, batches, seq_length=SEQ, micro_batch_size=1)
        times.append(time.perf_counter() - t)
    return times[2:]


def _time_plain_steps(model, batches, steps: int) -> list[float]:
    """Forward+backward of the model without megatron's schedule (which hard-codes a CUDA
    tensor and so cannot run without the device-rewriting mode)."""
    import torch

    times = []
    positions = torch.arange(SEQ)[None]
    for _ in range(steps + 2):
        t = time.perf_counter()
        for b in batches:
            loss = model[0](b["tokens"], positions, None, labels=b["labels"]).mean()
            loss.backward()
        times.append(time.perf_counter() - t)
    return times[2:]


def worker(world: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from k2mcore.compat import cpu as cpu_backend
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.parallel.ddp import wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    results = {}
    for name, over in LAYOUTS[world].items():
        sets = [f"{k}={json.dumps(v)}" for k, v in over.items()]
        cfg = load_config("k2-tiny", sets + [f"train.seq_length={SEQ}", "train.dtype=fp32"])
        groups = init_distributed(resolve_layout(cfg, world), seed=1)
        model = wrap_ddp(build_model(cfg, groups), groups, distributed_optimizer=False)
        dp = groups.layout.dp
        g = torch.Generator().manual_seed(0)
        batches = [
            {"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
            for s in torch.randint(0, 1024, (GLOBAL_BATCH // dp, SEQ + 1), generator=g)
        ]
        results[name] = statistics.median(_time_steps(model, groups, batches, steps))
        if world == 1 and cpu_backend.is_active():
            results["1rank-plain"] = statistics.median(_time_plain_steps(model, batches, steps))
            with cpu_backend.device_mode_suspended():  # for these steps only
                results["1rank-no-mode"] = statistics.median(
                    _time_plain_steps(model, batches, steps))
    if dist.get_rank() == 0:
        with open(os.path.join(out, f"{world}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.out)
    out = tempfile.mkdtemp()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for world in LAYOUTS:
        cmd = [sys.executable, __file__, "--worker", str(world), "--steps", str(args.steps),
               "--out", out]
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={world}", *cmd[1:]]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = {}
    for world in LAYOUTS:
        with open(os.path.join(out, f"{world}.json")) as f:
            rows.update({(world, k): v for k, v in json.load(f).items()})
    base = rows[(1, "1rank")]
    print(f"k2-tiny fwd+bwd, global batch {GLOBAL_BATCH} x {SEQ} tokens, median of {args.steps}")
    print(f"{'layout':14s} {'ranks':>5s} {'ms/step':>9s} {'vs 1 rank':>9s}")
    for (world, name), v in rows.items():
        if name in ("1rank-no-mode", "1rank-plain"):
            continue
        print(f"{name:14s} {world:5d} {v * 1e3:9.1f} {v / base:9.2f}x")
    with_mode, without = rows[(1, "1rank-plain")], rows[(1, "1rank-no-mode")]
    print(f"CPU backend TorchFunctionMode, model fwd+bwd on 1 rank (no schedule: megatron's "
          f"schedule cannot run without it): {with_mode * 1e3:.1f} ms with vs "
          f"{without * 1e3:.1f} ms without = {with_mode / without:.3f}x")


if __name__ == "__main__":
    main()
