"""Checkpoints: model and optimizer through megatron's dist-checkpointing (torch_dist), the rest
as JSON.

One checkpoint is a directory:

    <root>/step_00000042/
        metadata.json          completion marker, written last: step, consumed samples, layout,
                               scheduler, Adam step, size + CRC32 of every other file
        config.yaml            the resolved config
        dist/                  torch_dist checkpoint of model and optimizer (reshardable: keys are
                               global tensor names, shards carry their global offsets)
        rng/rank_00000.json    each rank's RNG states (restored only at the same layout)

Atomic: everything is written under `<root>/.tmp_step_00000042`; after a barrier rank 0 writes the
marker and renames the directory into place, so a crash leaves the previous checkpoint the newest
complete one. No unrestricted pickle on load: DCP's `.metadata` (a pickle) goes through an
allow-listed unpickler, every `torch.load` runs with weights_only forced on, our own files are JSON.

The optimizer state's form is k2mcore.optim.state's.
"""
from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from k2mcore.compat.dist_checkpoint import in_process_save_strategy
from k2mcore.checkpoint.commit import Committer
from k2mcore.checkpoint.dcp_reader import read_dcp_metadata  # noqa: F401 (re-exported)
from k2mcore.checkpoint.dcp_reader import restricted_unpickling as _restricted_unpickling
from k2mcore.checkpoint.rng import rng_state as _rng_state
from k2mcore.checkpoint.rng import set_rng_state as _set_rng_state
from k2mcore.checkpoint.format import (  # noqa: F401 (re-exported until importers move)
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    CheckpointError,
    is_checkpoint,
    latest_checkpoint,
    resolve_checkpoint,
    saved_step,
    has_optimizer_state,
    step_dir,
    validate_checkpoint,
)
from k2mcore.checkpoint.format import check_files as _check_files
from k2mcore.checkpoint.format import crc32 as _crc32
from k2mcore.checkpoint.format import first_line as _first_line
from k2mcore.checkpoint.format import read_json as _read_json
from k2mcore.checkpoint.format import read_marker as _read_marker
from k2mcore.checkpoint.format import versions as _versions
from k2mcore.checkpoint.format import write_json as _write_json
from k2mcore.config.schema import K2Config
from k2mcore.optim import state as optim_state
from k2mcore.optim.state import OPTIMIZER_SHARDING, child_optimizers, optimizer_name
from k2mcore.optim.state import SHARDING_METADATA as _OPTIM_METADATA  # noqa: F401 (tests)



# --------------------------------------------------------------------------------------------
# Save
def save_checkpoint(
    ckpt_root: str,
    step: int,
    model: list,
    optimizer: Any,
    scheduler: Any,
    *,
    consumed_samples: int,
    cfg: K2Config,
) -> str:
    """Write `<ckpt_root>/step_<N>` (collective over all ranks), prune to the last `keep`.

    Returns the checkpoint directory. Raises CheckpointError on every rank if any rank failed.
    """
    from megatron.core import dist_checkpointing

    from k2mcore.config.loader import dump_yaml

    start = time.perf_counter()
    rank = dist.get_rank()
    final = step_dir(ckpt_root, step)
    tmp = os.path.join(ckpt_root, f".tmp_step_{step:08d}")
    if rank == 0:
        Committer().prepare(tmp, subdirs=("dist", "rng"))  # removes a crashed save's leftovers
    dist.barrier()

    state, adam_step = _state_for_save(model, optimizer)
    try:
        dist_checkpointing.save(state, os.path.join(tmp, "dist"),
                                sharded_strategy=_save_strategy())
    except CheckpointException as exc:  # DCP gathered a failure (e.g. disk full) to all ranks
        raise CheckpointError(f"{final}: save failed: {_describe(exc)}") from exc
    _write_json(os.path.join(tmp, "rng", f"rank_{rank:05d}.json"), _rng_state())
    if rank == 0:
        dump_yaml(cfg, os.path.join(tmp, "config.yaml"))
    adam_steps = _all_gather(adam_step)
    dist.barrier()
    files = _checksums(tmp)

    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step,
        "consumed_samples": int(consumed_samples),
        "layout": {**_current_layout(model), "pipeline_layout": cfg.parallel.pipeline_layout,
                   "first_stage_layers": cfg.parallel.first_stage_layers,
                   "last_stage_layers": cfg.parallel.last_stage_layers,
                   "distributed_optimizer": cfg.parallel.distributed_optimizer},
        "optimizer": None if optimizer is None else {
            "name": cfg.optimizer.name, "sharding": OPTIMIZER_SHARDING,
            "adam_step": optim_state.agreed_step(adam_steps)},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "model": cfg.model.name,
        "versions": _versions(),
        "files": files,
    }
    error = None
    if rank == 0:
        try:
            _commit(tmp, final, meta)
        except Exception as exc:  # reported to every rank below, so none hangs in a barrier
            error = f"{final}: save failed before it was complete ({type(exc).__name__}: {exc})"
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)
    if rank == 0:
        try:
            _prune(ckpt_root, keep=cfg.checkpoint.keep, newest=final)
        except OSError as exc:  # the new checkpoint is complete; old ones stay a while longer
            print(f"checkpoint: could not prune {ckpt_root}: {exc}", flush=True)
        print(f"saved checkpoint {final} in {time.perf_counter() - start:.2f} s", flush=True)
    dist.barrier()  # every rank returns with the checkpoint committed and pruned
    return final


def _state_for_save(model: list, optimizer: Any) -> tuple[dict, Optional[float]]:
    """The sharded state to write, and the Adam step (0 if it never stepped; None without an
    optimizer)."""
    state = _model_state(model)
    adam_step = None
    if optimizer is not None:
        state["optimizer"], adam_step = optim_state.state_to_save(optimizer, state)
    return state, adam_step


def _commit(tmp: str, final: str, meta: dict) -> None:
    """Rank 0: marker last, then one rename — the checkpoint appears complete or not at all."""
    Committer().commit(tmp, final, meta)


def _prune(root: str, keep: int, newest: str) -> None:
    Committer().prune(root, keep, newest)


# --------------------------------------------------------------------------------------------
# Load
def load_checkpoint(path: str, model: list, optimizer: Any = None, scheduler: Any = None) -> dict:
    """Load a checkpoint (or the newest complete one under a root) into this rank's objects.

    Collective. Works at any layout: tensors are resharded by dist-checkpointing. RNG states are
    restored only when the layout (world size and every parallel size) equals the saved one,
    since per-rank generator streams have no meaning at another layout. Pass optimizer/scheduler
    None to load the model only. Returns metadata.json plus `path` and `rng_restored`.
    A CheckpointError after validation may leave the objects partly overwritten: treat it as fatal.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistLoadShardedStrategy,
    )
    from megatron.core.dist_checkpointing.validation import StrictHandling

    start = time.perf_counter()
    path = resolve_checkpoint(path)
    meta = _collective_validate(path)
    _check_common(os.path.join(path, "dist", "common.pt"))
    state = _model_state(model)
    saved_opt = meta["optimizer"] or {}
    if optimizer is not None:
        if not saved_opt:
            raise CheckpointError(f"{path}: holds no optimizer state (saved without one)")
        if saved_opt.get("name", "adamw") != optimizer_name(optimizer):
            raise CheckpointError(
                f"{path}: optimizer state is {saved_opt.get('name')!r}, this run uses "
                f"{optimizer_name(optimizer)!r} (Muon momentum is not Adam state)")
        state["optimizer"] = optim_state.state_to_load(optimizer, state)
    try:
        with _restricted_unpickling():
            loaded, _, not_in_ckpt = dist_checkpointing.load(
                state, os.path.join(path, "dist"),
                sharded_strategy=TorchDistLoadShardedStrategy(),
                strict=StrictHandling.RETURN_UNEXPECTED,  # requested keys absent from the ckpt
            )
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointError(
            f"{path}: cannot load model/optimizer state "
            f"(saved as model {meta.get('model')!r}, optimizer {saved_opt.get('name')!r}):"
            f" {_describe(exc)}"
        ) from exc
    # layers' _extra_state (TE's FP8 scaling history; None on local layers) is optional: a
    # converted checkpoint has none, and the layers keep their fresh state
    missing = sorted(k for k in set().union(*_all_gather(sorted(not_in_ckpt)))
                     if "_extra_state" not in k)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors of this model/optimizer are not in the checkpoint "
            f"(e.g. {missing[0]}); saved as model {meta.get('model')!r}, optimizer "
            f"{saved_opt.get('name')!r}"
        )

    for key, chunk in zip(_model_keys(model), model):
        getattr(chunk, "module", chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optim_state.apply_loaded_state(optimizer, loaded["optimizer"], saved_opt["adam_step"])
    if scheduler is not None and meta.get("scheduler"):
        _load_scheduler(scheduler, meta["scheduler"])
    same_layout = _layout_key(meta["layout"]) == _layout_key(_current_layout(model))
    if same_layout:
        _set_rng_state(_read_json(os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.json")))
    if dist.get_rank() == 0:
        note = "" if same_layout else " (other layout: RNG states not restored)"
        print(f"loaded checkpoint {path} (step {meta['step']}) in "
              f"{time.perf_counter() - start:.2f} s{note}", flush=True)
    return {**meta, "path": path, "rng_restored": same_layout}


def _load_scheduler(scheduler: Any, saved: dict) -> None:
    """Restore the step count; the schedule's shape follows the current config (so a run can be
    extended with a larger train.iters), and differences are reported."""
    current = scheduler.state_dict()
    diffs = [f"{k} {saved[k]} -> {v}" for k, v in current.items()
             if k != "num_steps" and k in saved and saved[k] != v]
    if diffs and dist.get_rank() == 0:
        print(f"checkpoint: LR/WD schedule differs from the saved one ({', '.join(diffs)}); "
              f"using the current config", flush=True)
    scheduler.num_steps = 0
    scheduler.step(increment=int(saved["num_steps"]))


def _collective_validate(path: str) -> dict:
    """Every rank checks sizes and a share of the checksums; all raise the same first error."""
    try:
        meta = _read_marker(path)
        errors = _check_files(path, meta, (dist.get_rank(), dist.get_world_size()), True)
    except CheckpointError as exc:
        meta, errors = None, [str(exc)]
    everyone = _all_gather(errors[:1])
    first = next((e[0] for e in everyone if e), None)
    if first:
        raise CheckpointError(first)
    return meta


def _check_common(path: str) -> None:
    """A legacy common.pt (megatron < 0.19 wrote one; 0.19 still loads it when present, in place
    of the common state inside the DCP files): tensors and plain data only."""
    if not os.path.exists(path):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: {_describe(exc)}") from None


def _checksums(tmp: str) -> dict:
    """{relative path: {size, crc32}} of the files under tmp; the reading is shared by ranks."""
    names = None
    if dist.get_rank() == 0:
        names = sorted(
            os.path.relpath(os.path.join(d, f), tmp)
            for d, _, fs in os.walk(tmp) for f in fs
        )
    names = _broadcast(names)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: {"size": os.path.getsize(os.path.join(tmp, n)),
                "crc32": _crc32(os.path.join(tmp, n))}
            for i, n in enumerate(names) if i % world == rank}
    merged: dict = {}
    for part in _all_gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


# --------------------------------------------------------------------------------------------
# State dicts
def _model_keys(model: list) -> list[str]:
    # Megatron-LM's names: 'model' without virtual stages, 'model0', 'model1', ... with them.
    # Only the dict structure uses them; tensors are keyed by global names (layer numbers are
    # global), so VPP and non-VPP checkpoints load into each other.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_state(model: list) -> dict:
    return {key: getattr(chunk, "module", chunk).sharded_state_dict()
            for key, chunk in zip(_model_keys(model), model)}


def _optimizers(optimizer: Any) -> list:
    return child_optimizers(optimizer)


# --------------------------------------------------------------------------------------------
# Layout
def _current_layout(model: list) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    return {
        "world_size": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "sp": bool(get_model_config(getattr(model[0], "module", model[0])).sequence_parallel),
    }


def _layout_key(layout: dict) -> tuple:
    keys = ("world_size", "tp", "pp", "vpp", "ep", "etp", "cp", "dp", "sp")
    return tuple(layout.get(k) for k in keys)


# --------------------------------------------------------------------------------------------
# torch_dist without writer processes
def _save_strategy() -> Any:
    """The in-process torch_dist writer, with the writing spread over data-parallel replicas.

    Without the spreading, every replicated tensor (all of them, under the distributed
    optimizer's model-space format) is written by data-parallel rank 0 alone. As Megatron-LM's
    default `--ckpt-fully-parallel-save`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(
        in_process_save_strategy(), ps.get_data_parallel_group(with_context_parallel=True))


# --------------------------------------------------------------------------------------------
# Small helpers
def _all_gather(obj: Any) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _describe(exc: BaseException) -> str:
    """One line for an exception from deep inside a load (DCP wraps each rank's failure)."""
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint CheckpointException
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if refused:
        return (f"refused to unpickle {refused.group(1)} (only tensors and plain data are "
                f"loaded from a checkpoint)")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: missing from the checkpoint"
    return f"{type(exc).__name__}: {_first_line(exc)}"
