"""The DALI backend: `fn.external_source` over megatron's dataset, prefetched, GPU output.

The source is a pure function of (micro-batch number, position in batch) -> sample, so DALI's
parallel external source can run it in `data.num_workers` worker processes, each computing its
batches ahead (`data.prefetch` deep) without shared state. On a GPU the pipeline copies the
outputs to the device (`.gpu()`) and hands them to torch without a host round trip; on CPU the
same pipeline runs with `device_id=None`.
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Callable, Iterator

import numpy as np
import torch

from k2mcore.config.schema import K2Config
from k2mcore.data.batches import FIELD_DTYPES, FIELDS, MicroBatchSampler, fetch_sample

_ARMED = False


def _die_with_parent(parent_pid: int) -> None:
    """In a DALI worker: exit when the rank that started it dies. DALI's workers outlive a
    SIGKILLed parent and keep its output pipes open (torch's DataLoader workers watch theirs)."""
    global _ARMED
    if _ARMED:
        return
    _ARMED = True
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: nothing to arm
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


class SampleSource:
    """DALI per-sample callback: SampleInfo -> (tokens, labels, loss_mask, position_ids)."""

    def __init__(self, dataset: Any, sampler: MicroBatchSampler) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.num_batches = len(sampler)
        self.owner_pid = os.getpid()

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        if os.getpid() != self.owner_pid:
            _die_with_parent(self.owner_pid)
        if info.iteration >= self.num_batches:
            raise StopIteration  # DALI ends the epoch; the iterator stops before asking
        return fetch_sample(self.dataset, self.sampler.indices(info.iteration)[info.idx_in_batch])


def dali_batches(dataset: Any, sampler: MicroBatchSampler, cfg: K2Config,
                 device: torch.device) -> tuple[Iterator[dict], Callable[[], None]]:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    if len(sampler) == 0:
        return iter(()), lambda: None
    on_gpu = device.type == "cuda"
    workers = cfg.data.num_workers
    parallel = workers > 0
    dali_types = {np.int64: types.INT64, np.float32: types.FLOAT}
    kwargs: dict = {}
    if parallel:
        # fork is cheap (the dataset is inherited) but unsafe once CUDA is initialized; spawn
        # pickles the source (megatron's datasets pickle; their .bin files are re-mapped).
        start = "spawn" if torch.cuda.is_initialized() else "fork"
        kwargs = dict(py_num_workers=workers, py_start_method=start)

    @pipeline_def(batch_size=sampler.micro_batch_size, num_threads=1,
                  device_id=(device.index if device.index is not None
                             else torch.cuda.current_device()) if on_gpu else None,
                  prefetch_queue_depth=cfg.data.prefetch, seed=cfg.train.seed, **kwargs)
    def pipeline():
        outs = fn.external_source(
            source=SampleSource(dataset, sampler), num_outputs=len(FIELDS), batch=False,
            parallel=parallel, dtype=[dali_types[FIELD_DTYPES[k]] for k in FIELDS],
            **({"prefetch_queue_depth": cfg.data.prefetch} if parallel else {}),
        )
        return tuple(o.gpu() for o in outs) if on_gpu else tuple(outs)

    pipe = pipeline()
    pipe.build()
    torch_dtypes = {np.int64: torch.int64, np.float32: torch.float32}

    def batches() -> Iterator[dict]:
        for _ in range(len(sampler)):
            outputs = pipe.run()
            batch = {}
            for name, tl in zip(FIELDS, outputs):
                dense = tl.as_tensor()  # [mbs, seq]: every sample has seq_length tokens
                out = torch.empty(dense.shape(), dtype=torch_dtypes[FIELD_DTYPES[name]],
                                  device=device)
                # copies into `out` (device-to-device on GPU, on torch's current stream)
                feed_ndarray(dense, out,
                             cuda_stream=torch.cuda.current_stream() if on_gpu else None)
                batch[name] = out
            yield batch

    def close() -> None:
        nonlocal pipe
        pipe = None  # DALI stops its workers when the pipeline is freed

    return batches(), close
