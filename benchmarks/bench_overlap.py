"""How long a training step waits on data-parallel collectives, overlap on and off.

    python benchmarks/bench_overlap.py [--steps 8] [--bucket-size 250000] [--world 4]

The widened k2-tiny of bench_muonclip.py (hidden 128, 8 x 64 tokens per step, fp32) at DP4 on gloo
ranks, ZeRO-1 AdamW and MuonClip, each with train.overlap_grad_reduce and
train.overlap_param_gather on and off, all four built side by side on the same process groups
and stepped in turn on the same batches (drifts in this shared machine's speed fall on all
alike). Per step, on the slowest rank:
  dp wait  wall time inside megatron's data-parallel sync calls (a bucket group's
           start/finish of the gradient reduction and the parameter gather): without overlap
           the collectives themselves, with overlap their dispatch and the waits for those
           still running when the step needs them;
  step     the whole step (zero_grad, forward/backward, optimizer step).
Medians over the steps after two warm-up steps. The buckets of the first chunk are printed;
the bucket size should give at least 4. On a CPU the ranks' compute and gloo's threads share the
same cores, so hiding communication behind compute gains less than on GPUs, where the
collectives run on the NICs and NVLink while the SMs compute.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

from bench_muonclip import GLOBAL_BATCH, SEQ, WIDE, _batches  # noqa: E402

MODES = [(opt, ov) for opt in ("adamw", "muonclip") for ov in (False, True)]


class _Clock:
    """Wall time inside megatron's bucket-group sync calls, outermost call only."""

    def __init__(self) -> None:
        self.seconds, self.depth, self.saved = 0.0, 0, []

    def __enter__(self) -> "_Clock":
        from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as G

        for name in ("start_grad_sync", "finish_grad_sync", "start_param_sync",
                     "finish_param_sync"):
            orig = getattr(G, name)
            self.saved.append((G, name, orig))
            setattr(G, name, self._timed(orig))
        return self

    def _timed(self, orig):
        def timed(*a, **kw):
            self.depth += 1
            start = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - start
        return timed

    def __exit__(self, *exc) -> None:
        for owner, name, orig in self.saved:
            setattr(owner, name, orig)


def _build(optimizer: str, overlap: bool, bucket_size: int, groups):
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import Overlap, ddp_param_layout, wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    flag = "true" if overlap else "false"
    cfg = load_config("k2-tiny", WIDE + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", f"optimizer.name={optimizer}",
        f"train.overlap_grad_reduce={flag}", f"train.overlap_param_gather={flag}",
        f"train.ddp_bucket_size={bucket_size}"])
    if groups is None:
        groups = init_distributed(resolve_layout(cfg, int(os.environ["WORLD_SIZE"])), seed=1)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    model = wrap_ddp(chunks, groups, distributed_optimizer=True, param_layout=param_layout,
                     overlap=Overlap.from_config(cfg))
    opt, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
    return cfg, groups, model, opt


def worker(steps: int, bucket_size: int, out: str) -> None:
    import torch.distributed as dist

    from k2mcore.training.step import forward_backward

    runs, groups = {}, None
    for opt, ov in MODES:
        cfg, groups, model, optimizer = _build(opt, ov, bucket_size, groups)
        runs[(opt, ov)] = {"cfg": cfg, "model": model, "opt": optimizer, "wait": [], "step": [],
                           "buckets": [len(b.buckets) for b in model[0].buffers]}
    for step in range(steps):
        for run in runs.values():
            batches = _batches(run["cfg"].model.vocab_size, step, groups, GLOBAL_BATCH)
            dist.barrier()
            with _Clock() as clock:
                start = time.perf_counter()
                run["opt"].zero_grad()
                forward_backward(run["model"], groups, batches, seq_length=SEQ,
                                 micro_batch_size=1)
                run["opt"].step()
                run["step"].append(time.perf_counter() - start)
            run["wait"].append(clock.seconds)
    mine = {f"{opt}/{ov}": {"wait": statistics.median(r["wait"][2:]),
                            "step": statistics.median(r["step"][2:]), "buckets": r["buckets"]}
            for (opt, ov), r in runs.items()}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        rows = {k: {"wait": max(e[k]["wait"] for e in every),
                    "step": max(e[k]["step"] for e in every), "buckets": every[0][k]["buckets"]}
                for k in mine}
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bucket-size", type=int, default=250_000)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.bucket_size, args.out)
        return
    from harness.launching import local_command, local_env

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = local_command(args.world, __file__, ["--worker", "--steps", str(args.steps),
                                                   "--bucket-size", str(args.bucket_size),
                                                   "--out", out])
        subprocess.run(cmd, env=local_env(), check=True, capture_output=True)
        with open(out) as f:
            rows = json.load(f)
    print(f"Data-parallel wait per step, widened k2-tiny at DP{args.world} ({GLOBAL_BATCH} x "
          f"{SEQ} tokens, fp32, gloo), bucket size {args.bucket_size:,} elements; medians of "
          f"{args.steps - 2} steps, slowest rank")
    print(f"{'optimizer':9s} {'overlap':7s} {'buckets':>12s} {'dp wait ms':>10s} {'x off':>6s} "
          f"{'step ms':>8s} {'x off':>6s}")
    for opt in ("adamw", "muonclip"):
        off = rows[f"{opt}/False"]
        for ov in (False, True):
            r = rows[f"{opt}/{ov}"]
            print(f"{opt:9s} {'on' if ov else 'off':7s} {str(r['buckets']):>12s} "
                  f"{1e3 * r['wait']:10.1f} {r['wait'] / off['wait']:6.2f} "
                  f"{1e3 * r['step']:8.1f} {r['step'] / off['step']:6.2f}")


if __name__ == "__main__":
    main()
