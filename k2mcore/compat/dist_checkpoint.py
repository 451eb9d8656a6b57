"""megatron-core dist-checkpointing internals that k2mcore's checkpoints adapt
(k2mcore/checkpoint/manager.py and dcp_reader.py use these; nothing else does).

- an in-process torch_dist writer (megatron's forks a process per file);
- the loader's DCP reader swapped for one whose `.metadata` goes through an allow-list.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch

from .patching import Patch, companion, declare

_TORCH = "megatron.core.dist_checkpointing.strategies.torch"
_SERIAL = "megatron.core.dist_checkpointing.serialization"

SAVE_KEYS = declare(Patch(
    "ckpt-in-process-save-keys", f"{_TORCH}._replace_state_dict_keys_with_sharded_keys",
    params=("sharded_state_dict", "keep_only_main_replica"),
    why="the in-process writer flattens the state as megatron's own save does",
    remove_when="megatron's torch_dist save can run without writer processes"))
SAVE_TO_PYT = companion(SAVE_KEYS, "ckpt-in-process-save-pyt", f"{_TORCH}.mcore_to_pyt_state_dict",
                        "its conversion to torch DCP's state dict",
                        params=("state_dict", "is_loading", "init_device",
                                "load_legacy_1d_flatten_tensors"))
SAVE_PLANNER = companion(SAVE_KEYS, "ckpt-in-process-save-planner",
                         f"{_TORCH}.MCoreSavePlanner.__init__", "megatron's DCP save planner",
                         params=("self", "args", "dedup_replicated_tensors",
                                 "can_run_decentralized_global_plan", "kwargs"))
READER_PARAMS = ("checkpoint_dir", "cache_metadata", "async_strategy")
READER = declare(Patch(
    "ckpt-restricted-reader", f"{_TORCH}._get_filesystem_reader", params=READER_PARAMS,
    why="megatron's torch_dist loader unpickles DCP's .metadata without restriction; k2mcore "
        "reads it through an allow-list (no code from a checkpoint runs on load)",
    remove_when="megatron reads DCP metadata with torch's weights_only unpickler"))
READER_COMMON = companion(
    READER, "ckpt-restricted-reader-common", f"{_SERIAL}._get_filesystem_reader",
    "megatron 0.19 reads the common state through its own imported name of the reader",
    params=READER_PARAMS)

def in_process_save_strategy(make_writer: Callable[[str], Any], group: Any = None) -> Any:
    """megatron's torch_dist format, written by torch DCP in this process (or, for an async
    save, in a thread of it) through `make_writer(dir)`, DCP's collectives on `group`.

    megatron's own writer (FileSystemWriterAsync) forks a process per file and keeps a
    spawn-mode multiprocessing Manager for the results: ~3 s of start-up on a 2-core machine,
    and entry scripts need a __main__ guard. The `.distcp` files and `.metadata` written here
    are the same DCP format megatron's torch_dist loader reads.

    `async_save` returns megatron's AsyncRequest (as its own async strategies do, so megatron's
    `dist_checkpointing.save(..., async_sharded_save=True)` adds its finalize steps): the
    tensors to write are copied to host memory first, so training can change the originals,
    and its `async_fn` runs torch DCP's save of the copies. `.last_writer` is the writer of the
    latest save (its `.checksums`).
    """
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from torch.distributed import checkpoint as dcp

    for patch in (SAVE_KEYS, SAVE_TO_PYT, SAVE_PLANNER):
        patch.check()

    class InProcessTorchDistSave(mtorch.TorchDistSaveShardedStrategy):
        last_writer: Any = None
        # False while the caller writes before it changes any tensor (a blocking save)
        copy_tensors = True

        def save(self, sharded_state_dict: dict, checkpoint_dir: Any) -> None:
            self._write(self._to_dcp(sharded_state_dict, copy=False), checkpoint_dir)

        def async_save(self, sharded_state_dict: dict, checkpoint_dir: Any,
                       async_strategy: str = "in-process") -> Any:
            return AsyncRequest(self._write, (self._to_dcp(sharded_state_dict,
                                                           copy=self.copy_tensors),
                                              checkpoint_dir), [])

        def _to_dcp(self, sharded_state_dict: dict, copy: bool) -> dict:
            flat, _, _ = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            if copy:  # only what this rank writes (main replicas), onto the host
                for shards in flat.values():
                    for sh in shards:
                        if isinstance(getattr(sh, "data", None), torch.Tensor):
                            sh.data = sh.data.detach().to("cpu", copy=True)
            return mtorch.mcore_to_pyt_state_dict(flat, is_loading=False)

        def _write(self, state: dict, checkpoint_dir: Any) -> None:
            writer = make_writer(str(checkpoint_dir))
            # plan caching (torch DCP's): a later save with the same local plans sends empty
            # ones and reuses the global plan, where the first gathers and scatters them all
            dcp.save(state, storage_writer=writer, process_group=group,
                     planner=mtorch.MCoreSavePlanner(flatten_state_dict=False,
                                                     can_run_decentralized_global_plan=False,
                                                     enable_plan_caching=True))
            self.last_writer = writer

    return InProcessTorchDistSave("torch_dist", 1)


@contextlib.contextmanager
def restricted_reader(make_reader: Callable[[Any], Any]) -> Iterator[list]:
    """While loading: every DCP reader megatron makes is `make_reader(dir)`, and every torch.load
    (ShardedObject bytes, which torch's planner loads with weights_only=False, and a legacy
    common.pt) is forced to weights_only=True. Yields the list of directories read, so the
    caller can check the swap took effect."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    READER.check()
    READER_COMMON.check()
    originals = (mtorch._get_filesystem_reader, serialization._get_filesystem_reader)
    used: list = []

    def get_reader(checkpoint_dir: Any, cache_metadata: bool = False,
                   async_strategy: str = "mcore") -> Any:
        used.append(checkpoint_dir)
        return make_reader(checkpoint_dir)

    saved_env = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                 "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    mtorch._get_filesystem_reader = serialization._get_filesystem_reader = get_reader
    try:
        yield used
    finally:
        mtorch._get_filesystem_reader, serialization._get_filesystem_reader = originals
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
