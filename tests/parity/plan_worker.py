"""The planner's measurements inside the layout-parity launches (layout_worker.py calls
`run_plan` for PLAN_LAYOUTS): for k2-tiny and a widened variant, one real training step per
optimizer with everything counted at once, and forward/backward passes under each recompute
choice, with the max-logit probe on and off. test_plan_parity.py sets k2mcore.plan against them.

Per rank and run it records:
  state        parameters, param/grad buffer bytes and optimizer-state bytes after a step
               (state_probe.measure_state: unique storages);
  saved_peak   the peak bytes saved for backward over the step's forward/backward
               (saved_bytes.count_saved_bytes: unique storages, parameters excluded);
  comm         bytes handed to collectives and p2p sends over the whole step, by kind
               (comm_probe.measure);
  comm_bus     the same step's bus bytes, by kind.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

PLAN_LAYOUTS = ("1rank", "tp2-sp", "pp2-vpp2", "ep2", "dp2", "tp2-ep2", "tp2-pp2-ep2", "cp2")
# wider everywhere, plain q_proj (q_lora_rank null), another expert count and head count
WIDE = ["model.hidden_size=96", "model.num_attention_heads=6", "model.num_experts=4",
        "model.moe_ffn_hidden_size=48", "model.ffn_hidden_size=160", "model.q_lora_rank=null",
        "model.kv_lora_rank=48"]
MODELS = {"tiny": [], "wide": WIDE}
# (optimizer, recompute, max-logit probe, counted step): a full step per optimizer without
# recompute (AdamW probe off, MuonClip on), and for k2-tiny forward/backward under selective
# (probe on) and full (probe off) recompute; the widened model's recompute choices are
# priced by the same terms (tests/plan/test_activations.py), so its launches are spared
RUNS = {
    "tiny": [("adamw", "none", False, True), ("muonclip", "none", True, True),
             ("adamw", "selective", True, False), ("adamw", "full", False, False)],
    "wide": [("adamw", "none", False, True), ("muonclip", "none", True, True)],
}


def plan_overrides(layout_name: str, model: str, optimizer: str, recompute: str,
                   probe: bool, dtype: str = "fp32") -> list[str]:
    """The k2-tiny overrides of one run (test_plan_parity.py plans the same config)."""
    from layout_worker import GLOBAL_BATCH, SEQ, layout_overrides

    return (layout_overrides(layout_name) + MODELS[model]
            + [f"train.seq_length={SEQ}", f"train.global_batch_size={GLOBAL_BATCH}",
               "train.micro_batch_size=1", f"train.dtype={dtype}", f"optimizer.name={optimizer}",
               f"train.recompute={recompute}",
               f"model.measure_max_attn_logit={'true' if probe else 'false'}"])


def _one(groups, layout_name: str, model: str, optimizer: str, recompute: str, probe: bool, *,
         counted: bool, dtype: str = "fp32") -> dict:
    import comm_probe
    from layout_worker import SEED, micro_batches
    from megatron.core import tensor_parallel
    from state_probe import measure_state

    from harness.saved_bytes import count_saved_bytes, model_storages
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import ddp_param_layout, wrap_ddp
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.training.step import forward_backward

    overrides = plan_overrides(layout_name, model, optimizer, recompute, probe, dtype)
    cfg = load_config("k2-tiny", overrides)
    if resolve_layout(cfg, groups.layout.world_size) != groups.layout:
        raise AssertionError(f"{layout_name}/{model}: the runs of a layout share its groups")
    torch.manual_seed(SEED)  # what init_distributed seeds, without rebuilding the groups
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    model_ = wrap_ddp(chunks, groups, distributed_optimizer=True, param_layout=param_layout)
    batches = micro_batches(cfg.model.vocab_size, groups)
    row = {"layout": layout_name, "model": model, "optimizer": optimizer, "recompute": recompute,
           "probe": probe, "dtype": dtype, "overrides": overrides, "rank": dist.get_rank(),
           "pp_rank": groups.pp_rank}
    exclude = model_storages(model_)
    if counted:
        opt, _ = build_optimizer(cfg, model_, groups, param_layout=param_layout)
        bus = Counter()
        with count_saved_bytes(exclude) as saved:
            row["comm"] = comm_probe.measure(cfg, groups, model_, opt, batches, bus=bus)
        row["comm_bus"] = dict(bus)
        row["state"] = measure_state(model_, opt)
    else:
        with count_saved_bytes(exclude) as saved:
            forward_backward(model_, groups, batches, seq_length=cfg.train.seq_length,
                             micro_batch_size=1)
    row["saved_peak"] = saved.peak
    return row


def run_plan(layout_name: str, out: str) -> None:
    """Every run of one layout on one set of process groups: each re-initialisation leaves
    its gloo groups' threads behind (megatron's DDP hooks keep the old model alive), and a few
    dozen of them slow every later collective of the launch several-fold."""
    from layout_worker import SEED

    from k2mcore.config.loader import load_config
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config("k2-tiny", plan_overrides(layout_name, "tiny", "adamw", "none", False))
    groups = init_distributed(resolve_layout(cfg, world), seed=SEED)
    rows = []
    for model, runs in RUNS.items():
        for optimizer, recompute, probe, counted in runs:
            rows.append(_one(groups, layout_name, model, optimizer, recompute, probe,
                             counted=counted))
    if layout_name == "1rank":  # bf16 weights, fp32 master: the accounting GPU plans rest on
        for optimizer in ("adamw", "muonclip"):
            rows.append(_one(groups, layout_name, "tiny", optimizer, "none",
                             optimizer == "muonclip", counted=True, dtype="bf16"))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        torch.save([r for rank_rows in gathered for r in rank_rows],
                   os.path.join(out, f"{layout_name}.plan.pt"))
