"""Saving and loading training checkpoints: model and optimizer through megatron's
dist-checkpointing (torch_dist), the rest as JSON (the format: k2mcore.checkpoint.format).

Every rank writes its shards under `<root>/.tmp_step_N`; after a barrier rank 0 commits the
directory (marker last, one rename: k2mcore.checkpoint.commit), so a crash leaves the previous
checkpoint the newest complete one. No unrestricted pickle on load: DCP's `.metadata` goes
through an allow-listed unpickler, every `torch.load` runs with weights_only forced on
(k2mcore.checkpoint.dcp_reader), our own files are JSON. The optimizer state's form is
k2mcore.optim.state's.

Save and load are collective over the default process group; an error on any rank is raised as
the same CheckpointError on every rank, so none is left waiting in a barrier.
"""
from __future__ import annotations

import functools
import os
import re
import threading
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from k2mcore.compat.dist_checkpoint import in_process_save_strategy
from k2mcore.config.schema import K2Config
from k2mcore.errors import CheckpointError
from k2mcore.optim import state as optim_state
from k2mcore.parallel.groups import ProcessGroups

from .collective import all_gather, all_true, broadcast, collective_validate
from .commit import Committer
from .dcp_reader import restricted_unpickling
from .format import (
    CONFIG,
    DIST,
    FORMAT,
    FORMAT_VERSION,
    RNG,
    file_entry,
    first_line,
    latest_checkpoint,
    read_json,
    resolve_checkpoint,
    rng_file,
    step_dir,
    tmp_step_dir,
    versions,
    write_json,
)
from .lineage import Lineage
from .pending import GcPause, PendingSave, gc_paused
from .rng import rng_state, set_rng_state
from .writer import checksumming_writer

#: the layout entries that must all match for per-rank RNG streams to mean the same again
_LAYOUT_KEYS = ("world_size", "tp", "pp", "vpp", "ep", "etp", "cp", "dp", "sp")


class CheckpointManager:
    """Checkpoints of one training run under `root`: save (with keep-K), load, the newest one.

    `groups` says the layout saved into metadata.json and compared on load (RNG states are
    restored only at the same layout), and which ranks share the writing. `committer` publishes
    a finished save and prunes old ones (tests pass one that fails part-way).
    """

    def __init__(self, root: str, cfg: K2Config, groups: ProcessGroups, *,
                 committer: Optional[Committer] = None) -> None:
        self.root = root
        self.cfg = cfg
        self.groups = groups
        self.committer = committer or Committer()
        self.pending: Optional[PendingSave] = None  # an async save still being written
        self.last_blocked_s = 0.0  # how long the latest save() held the caller
        self._strategy: Any = None
        self._validated = False
        self._removing: Optional[threading.Thread] = None  # rank 0 deleting pruned checkpoints
        self._gc = GcPause()
        # the release's config and tokenizer (k2mcore.checkpoint.lineage): read from the
        # checkpoint loaded, written into every one saved (rank 0)
        self.lineage = Lineage()

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint under root, or None."""
        return latest_checkpoint(self.root)

    def layout(self) -> dict:
        """The layout entry of metadata.json for this run."""
        p = self.cfg.parallel
        return {**self.groups.layout.sizes(), "pipeline_layout": p.pipeline_layout,
                "first_stage_layers": p.first_stage_layers,
                "last_stage_layers": p.last_stage_layers,
                "distributed_optimizer": p.distributed_optimizer}

    # ----------------------------------------------------------------------------------------
    def save(self, step: int, model: list, optimizer: Any, scheduler: Any, *,
             consumed_samples: int, blocking: bool = True, extra: Any = None) -> str:
        """Write `<root>/step_<N>` (collective over all ranks), prune to the last `keep`.

        blocking=False (checkpoint.async_save): return once this rank's shards are copied to host
        memory; a thread writes them while training goes on, and `poll()` (each step) or
        `wait()` commits the checkpoint once every rank has written its part. A save waits for
        the previous one first. Returns the checkpoint directory (committed when blocking).
        `extra`: more state, an object with `meta` (stored in metadata.json under "extra") and
        `write(directory)` (called on every rank, writing its files into the checkpoint: an
        unfinished RL rollout batch's old log-probabilities, k2mcore.rl.update).
        Raises CheckpointError on every rank if any rank failed (for an async save: from the
        poll() or wait() that finds it failed).
        """
        from k2mcore.parallel.ddp import sync_params

        self.wait()
        self.close()
        sync_params(model)  # overlap_param_gather: the stepped weights, not last step's shards
        self._gc.pause()  # until the commit (_finalize)
        try:
            return self._save(step, model, optimizer, scheduler,
                              consumed_samples=consumed_samples, blocking=blocking, extra=extra)
        except BaseException:
            self._gc.resume()
            raise

    def _save(self, step: int, model: list, optimizer: Any, scheduler: Any, *,
              consumed_samples: int, blocking: bool, extra: Any = None) -> str:
        from megatron.core import dist_checkpointing

        from k2mcore.config.loader import dump_yaml

        cfg = self.cfg
        start = time.perf_counter()
        rank = dist.get_rank()
        final, tmp = step_dir(self.root, step), tmp_step_dir(self.root, step)
        if rank == 0:  # a fresh tmp: whatever a crashed save of this step left is removed
            self.committer.prepare(tmp, subdirs=(DIST, RNG))
        dist.barrier()

        state = _model_state(model)
        adam_step = None
        if optimizer is not None:
            state["optimizer"], adam_step = optim_state.state_to_save(optimizer, state)
        strategy = self._save_strategy()
        # an async save writes host copies; a blocking one writes before anything changes
        strategy.base_strategy.copy_tensors = not blocking
        # the sharding is the same at every save of a run: megatron's global check of it
        # (every rank's shard metadata to every rank) runs on the first one only
        request = dist_checkpointing.save(state, os.path.join(tmp, DIST),
                                          sharded_strategy=strategy,
                                          validate_access_integrity=not self._validated,
                                          async_sharded_save=True)
        self._validated = True
        error = None
        try:
            write_json(os.path.join(tmp, rng_file(rank)), rng_state())
            if extra is not None:
                extra.write(tmp)
            if rank == 0:
                dump_yaml(cfg, os.path.join(tmp, CONFIG))
                self.lineage.write(tmp)
        except OSError as exc:  # this rank's own files (ENOSPC, EDQUOT, EIO ...)
            error = f"{final}: save failed: {type(exc).__name__}: {first_line(exc)}"
        pending = PendingSave(
            step=step, final=final, tmp=tmp, request=request, strategy=strategy, start=start,
            error=error, describe=_describe, meta={
                "format": FORMAT, "version": FORMAT_VERSION, "step": step,
                "consumed_samples": int(consumed_samples),
                "layout": self.layout(),
                "optimizer": None if optimizer is None else {
                    "name": cfg.optimizer.name, "sharding": optim_state.OPTIMIZER_SHARDING},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "model": cfg.model.name,
                "versions": versions(),
                "extra": None if extra is None else extra.meta,
            }, adam_step=adam_step)
        if blocking:
            pending.write()
            self._finalize(pending)
        else:
            pending.start_writing()
            self.pending = pending
        self.last_blocked_s = time.perf_counter() - start
        if not blocking and rank == 0:
            print(f"checkpoint {final}: copied in {self.last_blocked_s:.2f} s, writing in the "
                  "background", flush=True)
        return final

    def poll(self) -> None:
        """Commit the async save once every rank has written its part (collective: call it at
        the same point on every rank, e.g. after each step; one tiny all-reduce while a save is
        being written, nothing otherwise)."""
        if self.pending is not None and all_true(not self.pending.is_writing()):
            self._finalize(self.pending)

    def wait(self) -> None:
        """Block until the async save (if any) is written and committed (collective)."""
        if self.pending is not None:
            self.pending.join()
            self._finalize(self.pending)

    def close(self) -> None:
        """Finish deleting the checkpoints the last save pruned (local; call before exit)."""
        if self._removing is not None:
            self._removing.join()
            self._removing = None

    def _finalize(self, p: "PendingSave") -> None:
        """Collective, after every rank's writing ended: commit or, on any rank's failure,
        abandon (the partial directory is removed; the error is raised on every rank)."""
        self.pending = None
        try:
            self._commit(p)
        finally:
            self._gc.resume()

    def _commit(self, p: "PendingSave") -> None:
        gathered = all_gather((p.error, p.adam_step))  # every rank learns of any rank's failure
        self._abandon_if_failed(p.tmp, next((e for e, _ in gathered if e), None))
        for fn in p.request.finalize_fns:  # megatron's: rank 0 writes dist/metadata.json
            fn()
        meta = dict(p.meta)
        if meta["optimizer"] is not None:
            meta["optimizer"]["adam_step"] = optim_state.agreed_step([a for _, a in gathered])
        meta["files"] = _manifest(p.tmp, p.checksums())
        error = None
        if dist.get_rank() == 0:
            try:
                self.committer.commit(p.tmp, p.final, meta)
            except Exception as exc:  # reported to every rank below, so none hangs in a barrier
                error = (f"{p.final}: save failed before it was complete "
                         f"({type(exc).__name__}: {exc})")
        self._abandon_if_failed(p.tmp, broadcast(error))
        if dist.get_rank() == 0:
            try:
                trash = self.committer.prune(self.root, keep=self.cfg.checkpoint.keep,
                                             newest=p.final)
            except OSError as exc:  # the new checkpoint is complete; old ones stay a while longer
                print(f"checkpoint: could not prune {self.root}: {exc}", flush=True)
            else:  # set aside by rename already; deleted while training goes on
                self._removing = threading.Thread(target=self.committer.remove, args=(trash,),
                                                  name="k2m-remove", daemon=True)
                self._removing.start()
            print(f"saved checkpoint {p.final} in {time.perf_counter() - p.start:.2f} s",
                  flush=True)
        dist.barrier()  # every rank returns with the checkpoint committed and pruned

    def _abandon_if_failed(self, tmp: str, error: Optional[str]) -> None:
        """Collective. On a failed save (`error` agreed on every rank) remove the partial
        directory, so a full disk gets its space back, and raise the error on every rank; the
        previous checkpoint was never touched and is still the newest. The run then stops
        (k2m-train: the one line, exit 2): one that went on would go on without checkpoints."""
        if not error:
            return
        full = None
        if dist.get_rank() == 0:
            full = _disk_full_note(tmp)  # before the partial save's space comes back
            self.committer.discard(tmp)
        full = broadcast(full)
        raise CheckpointError(f"{error}{full or ''} (partial save removed; the newest complete "
                              f"checkpoint is still {latest_checkpoint(self.root) or 'none'})")

    def _save_strategy(self) -> Any:
        """The in-process torch_dist writer (one per manager: its save distribution and DCP's
        plans are computed at the first save and reused), with the writing spread over
        data-parallel replicas, and DCP's collectives on a gloo group of their own, so that an
        async save's thread never shares a group with training.

        Without the spreading, every replicated tensor (the model's weights) is written by
        data-parallel rank 0 alone. As Megatron-LM's default `--ckpt-fully-parallel-save`.
        """
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        if self._strategy is None:
            group = dist.new_group(backend="gloo")
            make_writer = functools.partial(checksumming_writer,
                                            direct_io=self.cfg.checkpoint.direct_io)
            self._strategy = FullyParallelSaveStrategyWrapper(
                in_process_save_strategy(make_writer, group), self.groups.dp_cp_group,
                do_cache_distribution=True)
        return self._strategy

    # ----------------------------------------------------------------------------------------
    def load(self, path: str, model: list, optimizer: Any = None, scheduler: Any = None) -> dict:
        """Load a checkpoint (or the newest complete one under a root) into this rank's objects.

        Collective. Works at any layout: tensors are resharded by dist-checkpointing. RNG states
        are restored only when the layout (world size and every parallel size) equals the saved
        one, since per-rank generator streams have no meaning at another layout. Pass
        optimizer/scheduler None to load the model only. Returns metadata.json plus `path` and
        `rng_restored`. A CheckpointError after validation may leave the objects partly
        overwritten: treat it as fatal.
        """
        start = time.perf_counter()
        path = resolve_checkpoint(path)
        meta = _load_state(path, model, optimizer, scheduler)
        if dist.get_rank() == 0:
            self.lineage = Lineage.read(path)
        current = self.groups.layout.sizes()
        same_layout = all(meta["layout"].get(k) == current.get(k) for k in _LAYOUT_KEYS)
        if same_layout:
            set_rng_state(read_json(os.path.join(path, rng_file(dist.get_rank()))))
        if dist.get_rank() == 0:
            note = "" if same_layout else " (other layout: RNG states not restored)"
            print(f"loaded checkpoint {path} (step {meta['step']}) in "
                  f"{time.perf_counter() - start:.2f} s{note}", flush=True)
        return {**meta, "path": path, "rng_restored": same_layout}


def load_weights(path: str, model: list) -> dict:
    """Load only the model of a checkpoint (or a root's newest one), e.g. in `load_model`'s
    1-rank process, which has no ProcessGroups of its own. Collective over the default group.
    The RNG states stay as they are: they belong to the training run. Returns metadata.json plus
    `path`."""
    start = time.perf_counter()
    path = resolve_checkpoint(path)
    meta = _load_state(path, model, None, None)
    if dist.get_rank() == 0:
        print(f"loaded checkpoint {path} (step {meta['step']}) in "
              f"{time.perf_counter() - start:.2f} s (weights only)", flush=True)
    return {**meta, "path": path}


def _load_state(path: str, model: list, optimizer: Any, scheduler: Any) -> dict:
    """Validate `path` on all ranks, then load model, optimizer and scheduler; returns metadata."""
    with gc_paused():
        return _load_state_now(path, model, optimizer, scheduler)


def _load_state_now(path: str, model: list, optimizer: Any, scheduler: Any) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta, checksums = collective_validate(path)
    try:
        _check_common(os.path.join(path, DIST, "common.pt"))
    except CheckpointError:
        checksums.raise_if_bad()  # a damaged file is the better first line
        raise
    state = _model_state(model)
    saved_opt = meta["optimizer"] or {}
    if optimizer is not None:
        if not saved_opt:
            raise CheckpointError(f"{path}: holds no optimizer state (saved without one)")
        name = optim_state.optimizer_name(optimizer)
        if saved_opt.get("name", "adamw") != name:
            raise CheckpointError(
                f"{path}: optimizer state is {saved_opt.get('name')!r}, this run uses "
                f"{name!r} (Muon momentum is not Adam state)")
        sharding = saved_opt.get("sharding")
        if sharding != optim_state.OPTIMIZER_SHARDING:
            raise CheckpointError(
                f"{path}: optimizer state saved in the {sharding!r} form; this version reads "
                f"only {optim_state.OPTIMIZER_SHARDING!r}")
        plan = optim_state.state_to_load(optimizer, state)
        state["optimizer"] = plan.tree
    try:
        with restricted_unpickling():
            loaded, _, not_in_ckpt = dist_checkpointing.load(
                state, os.path.join(path, DIST),
                sharded_strategy=TorchDistLoadShardedStrategy(),
                strict=StrictHandling.RETURN_UNEXPECTED,  # requested keys absent from the ckpt
            )
    except CheckpointError:
        checksums.raise_if_bad()
        raise
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        checksums.raise_if_bad()  # a damaged file explains a failed load best
        raise CheckpointError(
            f"{path}: cannot load model/optimizer state "
            f"(saved as model {meta.get('model')!r}, optimizer {saved_opt.get('name')!r}):"
            f" {_describe(exc)}"
        ) from exc
    checksums.raise_if_bad()  # before anything loaded reaches the model or the optimizer
    # layers' _extra_state (TE's FP8 scaling history; None on local layers) is optional: a
    # converted checkpoint has none, and the layers keep their fresh state
    missing = sorted(k for k in set().union(*all_gather(sorted(not_in_ckpt)))
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
        optim_state.apply_loaded_state(optimizer, plan, loaded["optimizer"],
                                       saved_opt["adam_step"])
    if scheduler is not None and meta.get("scheduler"):
        _load_scheduler(scheduler, meta["scheduler"])
    return meta


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


# --------------------------------------------------------------------------------------------
# Model state
def _model_keys(model: list) -> list[str]:
    # Megatron-LM's names: 'model' without virtual stages, 'model0', 'model1', ... with them.
    # Only the dict structure uses them; tensors are keyed by global names (layer numbers are
    # global), so VPP and non-VPP checkpoints load into each other.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_state(model: list) -> dict:
    """The sharded state dict of the model chunks, as it is saved."""
    return {key: getattr(chunk, "module", chunk).sharded_state_dict()
            for key, chunk in zip(_model_keys(model), model)}


# --------------------------------------------------------------------------------------------
# Checks
def _check_common(path: str) -> None:
    """A legacy common.pt (megatron < 0.19 wrote one; 0.19 still loads it when present, in place
    of the common state inside the DCP files): tensors and plain data only."""
    if not os.path.exists(path):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: {_describe(exc)}") from None


def _manifest(tmp: str, written: dict) -> dict:
    """{relative path: {size, crc32}} of every file under tmp: those DCP wrote were checksummed
    on their way to disk (`written`, every rank's); rank 0 reads the few small others (config,
    RNG states, megatron's dist/metadata.json)."""
    merged: dict = {}
    for part in all_gather({os.path.join(DIST, k): v for k, v in written.items()}):
        merged.update(part)
    if dist.get_rank() == 0:
        for d, _, fs in os.walk(tmp):
            for f in fs:
                rel = os.path.relpath(os.path.join(d, f), tmp)
                if rel not in merged:
                    merged[rel] = file_entry(os.path.join(tmp, rel))
    return dict(sorted(merged.items()))


def _describe(exc: BaseException) -> str:
    """One line for an exception from deep inside a save or load (DCP wraps each rank's)."""
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
    return f"{type(exc).__name__}: {first_line(exc)}"


def _disk_full_note(path: str) -> Optional[str]:
    """': no space left on ...' when the filesystem under `path` is (all but) full. A write that
    hits ENOSPC inside torch.save's zip writer surfaces as an `unexpected pos` RuntimeError
    without the errno, so the free space is what tells."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if free >= max(1 << 20, total // 1000):
        return None
    return f": no space left on the device ({free} of {total} bytes free)"
