"""Context parallelism at a long sequence: the bytes saved for backward per rank and the bytes
CP moves, on k2-tiny at CP_SEQ tokens (one micro-batch), for test_context_parallel.py.

Run by layout_worker.py in the 1-rank launch (the reference: plain attention, no blockwise path)
and the 4-rank launch (CP4, blockwise with CP_BLOCK-token key blocks).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

CP_SEQ, CP_BLOCK = 4096, 512
#: layout name -> (parallel.cp, model.attention_block_size); the reference's block is the whole
#: sequence, so the plain attention runs
RUNS = {"1rank": (1, CP_SEQ), "cp4": (4, CP_BLOCK)}


def measure(name: str, out: str, *, cp: int = 0, block: int = 0, seq: int = CP_SEQ) -> dict:
    """One forward/backward at `seq` tokens at `cp` with `block`-token key blocks (0: RUNS[name];
    block 0: the default); writes (rank 0) and returns {loss, per-rank saved peak and CP ops}."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from harness.comm_bytes import count_collective_bytes
    from harness.saved_bytes import count_saved_bytes, model_storages
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.parallel.ddp import wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.training.step import forward_backward

    if not cp:
        cp, block = RUNS[name]
    overrides = [f"train.seq_length={seq}", "train.dtype=fp32", f"parallel.cp={cp}",
                 "model.moe_router_bias_update_rate=0.0"]
    if block:
        overrides.append(f"model.attention_block_size={block}")
    cfg = load_config("k2-tiny", overrides)
    groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))), seed=1)
    model = wrap_ddp(build_model(cfg, groups), groups, distributed_optimizer=False)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=g)
    batch = [{"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, seq)}]
    log: list = []
    with count_saved_bytes(model_storages(model)) as saved:
        with count_collective_bytes(by_kind=True, log=log):
            loss = forward_backward(model, groups, batch, seq_length=seq, micro_batch_size=1)
    cp_ops: dict = {}
    for label, op, nbytes, _shape, _site, bus in log:
        if label == "cp":
            handed, moved, calls = cp_ops.get(op, (0, 0.0, 0))
            cp_ops[op] = (handed + nbytes, moved + bus, calls + 1)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"saved_peak": saved.peak, "cp_ops": cp_ops})
    m = cfg.model
    result = {"loss": loss, "per_rank": per_rank, "layers": m.num_layers,
              "latent_width": m.kv_lora_rank + m.qk_rope_head_dim, "cp": cp, "seq": seq,
              "heads": m.num_attention_heads, "qk": m.qk_nope_head_dim + m.qk_rope_head_dim,
              "v": m.v_head_dim, "block": block or cfg.model.attention_block_size}
    if dist.get_rank() == 0 and out:
        torch.save(result, os.path.join(out, f"{name}.cp_saved.pt"))
    return result
