"""Checkpoint scenarios, run by test_checkpoint.py (results land in --out for the test to check).

`--phase save` (under torchrun, 4 ranks): trains k2-tiny at TP2 x EP2 (SP, ETP1, DP2), saves at
steps 1, 2 and 4 with keep=2, records the reference (weights and optimizer state at step 2,
losses and weights after steps 3-4), interrupts a save of step 5 before its commit, resumes step 2
at the same layout, then at PP2 x VPP2 x EP2 (another layout, same launch).
`--phase load` (plain process, 1 rank): resumes step 2 at 1 rank, runs the corrupt, incomplete
and planted-pickle scenarios on copies of it, and a round trip of megatron's non-distributed
optimizer.
Several scenarios share a launch because each process start costs seconds on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import shutil
import sys
import time

import torch
import torch.distributed as dist

from k2mcore import checkpoint as ck
from k2mcore.config.loader import load_config
from k2mcore.model.build import build_model
from k2mcore.optim.build import build_optimizer
from k2mcore.optim.chain import child_optimizers, inner_optimizers
from k2mcore.parallel.ddp import wrap_ddp
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout
from k2mcore.parallel.reshard import gather_full
from k2mcore.training.step import forward_backward

# megatron's own gathered model-space form: an independent view of the distributed optimizer
MEGATRON_FORM = {"distrib_optim_sharding_type": "fully_reshardable",
                 "chained_optim_avoid_prefix": True}

LAYOUTS: dict[str, dict] = {
    "tp2-ep2": {"parallel.tp": 2, "parallel.sp": True, "parallel.ep": 2, "parallel.etp": 1},
    "pp2-vpp2-ep2": {"parallel.pp": 2, "parallel.vpp": 2, "parallel.ep": 2},
    "1rank": {},
    "1rank-plain-adam": {"parallel.distributed_optimizer": False},
    # context parallelism (blockwise attention from the gathered latent), 4 ranks: DP2
    "cp2-ep2": {"parallel.cp": 2, "parallel.ep": 2, "model.attention_block_size": 8},
}
GLOBAL_BATCH, SEQ, SEED = 4, 32, 1234
PAYLOAD_MARK = "pickle_payload_ran"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress with elapsed seconds (rank 0), for finding what makes the test slow."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", flush=True)


def build(layout: str):
    overrides = [f"{k}={json.dumps(v)}" for k, v in LAYOUTS[layout].items()]
    cfg = load_config("k2-tiny", overrides + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", f"train.global_batch_size={GLOBAL_BATCH}",
        "checkpoint.keep=2", "train.iters=20",
        # the init PARAM_ATOL was calibrated on: at k2-tiny's 0.02 a few near-zero output-layer
        # gradients whose sign reduction order flips make Adam differ by ~3e-6 after resharding
        "model.init_std=0.006",
    ])
    groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))), seed=SEED)
    model = wrap_ddp(build_model(cfg, groups), groups,
                     distributed_optimizer=cfg.parallel.distributed_optimizer)
    optimizer, scheduler = build_optimizer(cfg, model, groups)
    return cfg, model, optimizer, scheduler, groups


class CrashBeforeRename(ck.Committer):
    """A save that dies while committing: its marker half written, nothing renamed."""

    def commit(self, tmp: str, final: str, marker=None) -> None:
        with open(os.path.join(tmp, ck.MARKER + ".part"), "w") as f:
            f.write(json.dumps(marker)[:100])
        raise OSError("simulated crash before the rename")

    def discard(self, tmp: str) -> None:
        """A crashed process cleans up nothing: the half-written directory stays (a failed save
        that lives on removes its own; test_disk_full.py)."""


def train_step(model, optimizer, scheduler, step: int, groups) -> float:
    """One step on a fixed global batch of `step` (this data-parallel rank's share of it)."""
    g = torch.Generator().manual_seed(SEED + step)
    data = torch.randint(0, 1024, (GLOBAL_BATCH, SEQ + 1), generator=g)
    dp, rank = groups.layout.dp, groups.dp_rank
    per = GLOBAL_BATCH // dp
    batches = [{"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
               for s in data[rank * per:(rank + 1) * per]]
    # as Megatron-LM's train_step: without it megatron's non-distributed optimizers leave
    # param.grad aliasing main_grad, and the next backward adds each gradient twice
    optimizer.zero_grad()
    loss = forward_backward(model, groups, batches, seq_length=SEQ, micro_batch_size=1)
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(increment=1)
    return loss


def gather_optimizer(model, optimizer) -> dict:
    """Full-shape Adam state (fp32 param, exp_avg, exp_avg_sq) per parameter, on rank 0.

    Uses megatron's own model-space view of the distributed optimizer ('fully_reshardable'),
    so it is comparable between layouts.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        apply_factories,
        is_main_replica,
    )

    model_sd = {f"m{i}": c.module.sharded_state_dict() for i, c in enumerate(model)}
    state = {i: child.sharded_state_dict(model_sd, metadata=MEGATRON_FORM)["param_state"]
             for i, child in enumerate(child_optimizers(optimizer))}
    apply_factories(state)
    local = []
    for sh in nested_values(state):
        if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
            pre = sh.prepend_axis_num
            idx = tuple(sh.global_offset[:pre]) + tuple(
                slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.local_shape))
            local.append((sh.key, sh.global_shape, idx, sh.data.detach().float().clone()))
    pieces: list = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, local)
    if dist.get_rank() != 0:
        return {}
    full: dict = {}
    for part in pieces:
        for key, shape, idx, data in part:
            full.setdefault(key, torch.full(shape, float("nan")))[idx] = data
    return full


def snapshot(model, optimizer) -> dict:
    return {"params": gather_full(model), "optim": gather_optimizer(model, optimizer)}


def resume_at(path: str, layout: str, steps: tuple = (3, 4), save_to: str = "") -> dict:
    """Build at `layout`, load `path`, record what was loaded and two more steps. `save_to`:
    then save there (a root) and record that state and two steps more."""
    cfg, model, optimizer, scheduler, groups = build(layout)
    log(f"built {layout}")
    start = time.perf_counter()
    checkpoints = ck.CheckpointManager(os.path.dirname(path), cfg, groups)
    meta = checkpoints.load(path, model, optimizer, scheduler)
    load_s = time.perf_counter() - start
    rng_after_load = ck.rng_state()
    log("loaded")
    loaded = snapshot(model, optimizer)
    log("snapshot")
    lr = optimizer.param_groups[0]["lr"]
    losses = [train_step(model, optimizer, scheduler, s, groups) for s in steps]
    out = {"meta": {k: meta[k] for k in ("step", "consumed_samples", "rng_restored", "path")},
           "load_s": load_s, "loaded": loaded, "losses": losses, "lr": lr,
           "after": gather_full(model), "rng_after_load": rng_after_load}
    if save_to:
        saver = ck.CheckpointManager(save_to, cfg, groups)
        saver.save(steps[-1], model, optimizer, scheduler,
                   consumed_samples=steps[-1] * GLOBAL_BATCH)
        saver.close()
        out["saved"] = snapshot(model, optimizer)
        out["lr_next"] = optimizer.param_groups[0]["lr"]
        later = (steps[-1] + 1, steps[-1] + 2)
        out["later_losses"] = [train_step(model, optimizer, scheduler, s, groups) for s in later]
        out["later_after"] = gather_full(model)
    return out


def phase_save(out: str) -> None:
    root = os.path.join(out, "ckpt")
    log("imported")
    cfg, model, optimizer, scheduler, groups = build("tp2-ep2")
    checkpoints = ck.CheckpointManager(root, cfg, groups)
    rank0 = dist.get_rank() == 0
    log("built tp2-ep2")
    times, result = [], {}
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from harness.comm_bytes import count_collective_bytes

    for step in (1, 2):
        train_step(model, optimizer, scheduler, step, groups)
        log(f"step {step}")
        start = time.perf_counter()
        with count_collective_bytes() as counts:  # tensors handed to collectives while saving
            checkpoints.save(step, model, optimizer, scheduler,
                             consumed_samples=step * GLOBAL_BATCH)
        times.append(time.perf_counter() - start)
    # the control: megatron's gathered form moves this rank's optimizer state through them
    with count_collective_bytes() as control:
        gather_optimizer(model, optimizer)
    held = sum(t.numel() * t.element_size() for inner in inner_optimizers(optimizer)
               for st in inner.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() and t.stride()[0])
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (sum(counts.values()), sum(control.values()), held))
    result["collective_bytes"] = per_rank
    rng_at_save = ck.rng_state()
    result["step2"] = snapshot(model, optimizer)
    result["lr3"] = optimizer.param_groups[0]["lr"]
    log("snapshot")
    result["losses"] = [train_step(model, optimizer, scheduler, s, groups) for s in (3, 4)]
    result["after"] = gather_full(model)
    log("steps 3-4")
    checkpoints.save(4, model, optimizer, scheduler, consumed_samples=16)
    checkpoints.close()  # the pruned step's deletion runs in the background until here
    result["after_keep"] = sorted(os.listdir(root))

    # a save that dies after writing everything but before its commit
    crashing = ck.CheckpointManager(root, cfg, groups, committer=CrashBeforeRename())
    try:
        crashing.save(5, model, optimizer, scheduler, consumed_samples=20)
        result["interrupted_error"] = None
    except ck.CheckpointError as exc:
        result["interrupted_error"] = str(exc)
    result["after_interrupt"] = sorted(os.listdir(root))
    result["latest_after_interrupt"] = checkpoints.latest()
    # load step 2 explicitly from here on (the root's newest is step 4)
    step2 = ck.step_dir(root, 2)
    log("interrupted save")
    same = resume_at(step2, "tp2-ep2")
    log("resumed at tp2-ep2")
    rngs: list = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, same.pop("rng_after_load") == rng_at_save)
    same["rng_equal_all_ranks"] = all(rngs)
    result["same_layout"] = same
    result["other_layout"] = resume_at(step2, "pp2-vpp2-ep2")
    log("resumed at pp2-vpp2-ep2")
    # saved at CP1, resumed at CP2; that run saves at step 4, which the load phase resumes at
    # CP1 (1 rank)
    result["cp_layout"] = resume_at(step2, "cp2-ep2", save_to=os.path.join(out, "ckpt-cp2"))
    log("resumed at cp2-ep2")
    result["save_s"] = times
    if rank0:
        torch.save(result, os.path.join(out, "save_phase.pt"))


def phase_load(out: str) -> None:
    root = os.path.join(out, "ckpt")
    step2 = ck.step_dir(root, 2)
    log("imported")
    result = resume_at(step2, "1rank")
    result.pop("rng_after_load")
    from_cp = resume_at(ck.step_dir(os.path.join(out, "ckpt-cp2"), 4), "1rank", steps=(5, 6))
    from_cp.pop("rng_after_load")
    result["from_cp2"] = from_cp
    log("resumed the CP2 checkpoint")
    cfg, model, optimizer, scheduler, groups = build("1rank")
    checkpoints = ck.CheckpointManager(root, cfg, groups)
    result["errors"] = error_scenarios(out, step2, checkpoints, model, optimizer, scheduler)
    log("error scenarios")
    result["latest_from_root"] = checkpoints.load(root, model, None, None)["step"]
    result["plain_adam"] = plain_adam_round_trip(os.path.join(out, "plain"))
    log("plain adam")
    torch.save(result, os.path.join(out, "load_phase.pt"))


def plain_adam_round_trip(root: str) -> dict:
    """megatron's non-distributed optimizer (state keyed per parameter, step as 'common_step'):
    save at step 2, continue to 3; load step 2 into fresh objects, redo step 3."""
    cfg, model, optimizer, scheduler, groups = build("1rank-plain-adam")
    for step in (1, 2):
        train_step(model, optimizer, scheduler, step, groups)
    ck.CheckpointManager(root, cfg, groups).save(2, model, optimizer, scheduler, consumed_samples=8)
    want = [train_step(model, optimizer, scheduler, 3, groups)], gather_full(model)
    cfg, model, optimizer, scheduler, groups = build("1rank-plain-adam")
    ck.CheckpointManager(root, cfg, groups).load(root, model, optimizer, scheduler)
    got = [train_step(model, optimizer, scheduler, 3, groups)], gather_full(model)
    return {"losses": (want[0], got[0]), "after": (want[1], got[1])}


def error_scenarios(out: str, good: str, checkpoints, model, optimizer, scheduler) -> dict:
    """Damaged copies of a good checkpoint -> the CheckpointError message (or None)."""
    bad_root = os.path.join(out, "bad")
    shutil.rmtree(bad_root, ignore_errors=True)
    errors: dict = {}

    def attempt(name: str, damage) -> None:
        path = os.path.join(bad_root, name, "step_00000002")
        shutil.copytree(good, path)
        damage(path)
        try:
            checkpoints.load(path, model, optimizer, scheduler)
            errors[name] = None
        except ck.CheckpointError as exc:
            errors[name] = str(exc)

    def distcp(path: str) -> str:
        d = os.path.join(path, "dist")
        return os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".distcp"))[0])

    def truncate(path: str) -> None:
        f = distcp(path)
        os.truncate(f, os.path.getsize(f) // 2)

    def flip(path: str) -> None:
        f = distcp(path)
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))

    attempt("no_marker", lambda p: os.remove(os.path.join(p, ck.MARKER)))
    attempt("bad_marker", lambda p: open(os.path.join(p, ck.MARKER), "w").write("{not json"))
    attempt("truncated", truncate)
    attempt("flipped", flip)
    attempt("missing_rng", lambda p: os.remove(os.path.join(p, "rng", "rank_00000.json")))
    attempt("other_sharding", _set_sharding("fully_reshardable"))
    mark = os.path.join(out, PAYLOAD_MARK)
    attempt("pickle_metadata", plant(os.path.join("dist", ".metadata"), _payload(mark)))
    attempt("pickle_common", plant(os.path.join("dist", "common.pt"), _torch_payload(mark)))
    attempt("pickle_sharded_object", plant_sharded_object(mark))
    tmp = os.path.join(out, "ckpt", ".tmp_step_00000005")
    try:
        checkpoints.load(tmp, model, optimizer, scheduler)
        errors["tmp_dir"] = None
    except ck.CheckpointError as exc:
        errors["tmp_dir"] = str(exc)
    errors["payload_ran"] = os.path.exists(mark)
    return errors


def _set_sharding(name: str):
    def damage(path: str) -> None:
        marker = os.path.join(path, ck.MARKER)
        meta = json.load(open(marker))
        meta["optimizer"]["sharding"] = name
        json.dump(meta, open(marker, "w"))
    return damage


def resign(path: str, rel: str) -> None:
    """Record a replaced file's size and CRC in metadata.json, as an attacker with write access
    would: then only the restricted unpickling stands in the way."""
    meta_path = os.path.join(path, ck.MARKER)
    with open(meta_path) as f:
        meta = json.load(f)
    full = os.path.join(path, rel)
    meta["files"][rel] = {"size": os.path.getsize(full), "crc32": ck.crc32(full)}
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def plant(rel: str, payload: bytes):
    def damage(path: str) -> None:
        with open(os.path.join(path, rel), "wb") as f:
            f.write(payload)
        resign(path, rel)
    return damage


def plant_sharded_object(mark: str):
    """Point one ShardedObject (a module's `_extra_state`, stored as bytes inside a .distcp
    file) at a malicious torch.save payload appended to that file. torch's DCP planner
    unpickles such bytes with weights_only=False unless forced."""
    def damage(path: str) -> None:
        md_path = os.path.join(path, "dist", ".metadata")
        md = ck.read_dcp_metadata(md_path)
        index, info = next((i, v) for i, v in md.storage_data.items()
                           if "_extra_state" in i.fqn)
        data_file = os.path.join(path, "dist", info.relative_path)
        payload = _torch_payload(mark)
        offset = os.path.getsize(data_file)
        with open(data_file, "ab") as f:
            f.write(payload)
        md.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
        with open(md_path, "wb") as f:
            pickle.dump(md, f)
        for rel in (os.path.join("dist", ".metadata"), os.path.join("dist", info.relative_path)):
            resign(path, rel)
    return damage


class _Evil:
    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))  # creates the mark file if ever unpickled


def _payload(mark: str) -> bytes:
    return pickle.dumps(_Evil(mark))


def _torch_payload(mark: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _Evil(mark)}, buf)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", choices=("save", "load"), required=True)
    args = ap.parse_args()
    (phase_save if args.phase == "save" else phase_load)(args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
