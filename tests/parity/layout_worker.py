"""Runs one forward/backward of k2-tiny per layout and writes loss + full-shape grads.

Launched by test_layout_parity.py: once as a plain process (the 1-rank reference, which also
writes the initial weights every layout then loads) and under torchrun for the layouts.
Several layouts run in one launch (re-initializing megatron's groups) because each process
start costs seconds of CPU on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from k2mcore.config.loader import load_config
from k2mcore.model.build import build_model
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout, stage_parameters
from k2mcore.parallel.reshard import gather_full, scatter_full
from k2mcore.training.step import forward_backward, wrap_ddp

LAYOUTS: dict[str, dict] = {
    "1rank": {},
    "tp2-sp": {"parallel.tp": 2, "parallel.sp": True},
    "pp2": {"parallel.pp": 2},
    "pp2-vpp2": {"parallel.pp": 2, "parallel.vpp": 2},
    "pp2-uneven": {"parallel.pp": 2, "parallel.first_stage_layers": 1,
                   "parallel.last_stage_layers": 3},
    "ep2": {"parallel.ep": 2},
    "dp2": {},
    "tp2-ep2": {"parallel.tp": 2, "parallel.sp": True, "parallel.ep": 2, "parallel.etp": 1},
    "tp2-pp2-ep2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.ep": 2, "parallel.sp": True},
}
GLOBAL_BATCH, SEQ, SEED = 4, 32, 1234


def micro_batches(vocab: int) -> list[dict]:
    """This data-parallel rank's share of a fixed global batch, one sequence per micro-batch."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    mine = data[rank * per_rank : (rank + 1) * per_rank]
    return [
        {"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
        for s in mine
    ]


def run(name: str, out: str, init_path: str, write_init: bool) -> None:
    overrides = [f"{k}={json.dumps(v)}" for k, v in LAYOUTS[name].items()]
    cfg = load_config("k2-tiny", overrides + [f"train.seq_length={SEQ}", "train.dtype=fp32"])
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(cfg.parallel, seed=SEED)
    model = wrap_ddp(build_model(cfg), distributed_optimizer=False)
    # parameters this rank holds, against the analytic count `k2m-train --check` prints
    from megatron.core import parallel_state as ps

    held = sum(p.numel() for chunk in model for p in chunk.module.parameters())
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (ps.get_pipeline_model_parallel_rank(), held))
    expected = stage_parameters(cfg, layout)
    fresh = gather_full(model)  # as built: train.init=layout_invariant
    if write_init and dist.get_rank() == 0:
        torch.save(fresh, init_path)
    scatter_full(model, torch.load(init_path, weights_only=True))
    loss = forward_backward(
        model, micro_batches(cfg.model.vocab_size), seq_length=SEQ, micro_batch_size=1
    )
    grads = gather_full(model, swap=lambda p: p.main_grad)
    if dist.get_rank() == 0:
        torch.save(
            {"loss": loss, "grads": grads, "param_counts": counts, "expected_counts": expected,
             "fresh_weights": fresh},
            os.path.join(out, f"{name}.pt"),
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--write-init", action="store_true")
    args = ap.parse_args()
    init_path = os.path.join(args.out, "init.pt")
    for name in args.layouts.split(","):
        run(name, args.out, init_path, args.write_init)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
