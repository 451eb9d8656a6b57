"""Micro-batch iterators over megatron's datasets: a DALI pipeline (dali_loader.py) or a torch
DataLoader (here), chosen by `build_data_iterator`.

Both backends draw the same sample indices (`MicroBatchSampler`) and read them with the same
`fetch_sample`, so for a given (config, dp rank, consumed samples) they yield identical batches;
the choice is about where the work runs (DALI: its worker processes and prefetch queue, outputs
on the GPU when there is one; torch: DataLoader workers, pinned memory).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from k2mcore import platform
from k2mcore.config.schema import K2Config
from k2mcore.data.batches import FIELDS, MicroBatchSampler, fetch_sample
from k2mcore.data.datasets import SPLITS, DataSummary, build_datasets, check_data
from k2mcore.data.errors import DataError

log = logging.getLogger(__name__)

class DataIterator:
    """Iterator[dict] of micro-batches: tokens/labels/position_ids [mbs, seq] int64, loss_mask
    [mbs, seq] float32. `consumed_samples` (global, all DP ranks) after the batches yielded so
    far is what a checkpoint stores to resume here."""

    def __init__(self, batches: Iterator[dict], sampler: MicroBatchSampler, backend: str,
                 close: Optional[Callable[[], None]] = None) -> None:
        self._batches = batches
        self.sampler = sampler
        self.backend = backend
        self._yielded = 0
        self._close = close

    @property
    def consumed_samples(self) -> int:
        return self.sampler.consumed_samples + self._yielded * self.sampler.stride

    def __len__(self) -> int:
        return len(self.sampler) - self._yielded

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        if self._yielded >= len(self.sampler):
            self.close()
            raise StopIteration
        batch = next(self._batches)
        self._yielded += 1
        return batch

    def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    """DALI is the default backend when it imports (about 0.5 s, hence cached and lazy)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another CUDA/driver
        return False
    return True


def resolve_loader(cfg: K2Config) -> str:
    name = cfg.data.loader
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise DataError("data.loader: 'dali' but nvidia.dali does not import "
                        "(pip install nvidia-dali-cuda120, or set data.loader=torch)")
    if name not in ("dali", "torch"):
        raise DataError(f"data.loader: {name!r} is not one of auto, dali, torch")
    return name


def _collate(samples: list[tuple[np.ndarray, ...]]) -> dict:
    return {k: torch.from_numpy(np.stack([s[i] for s in samples])) for i, k in enumerate(FIELDS)}


class _TorchSamples(torch.utils.data.Dataset):
    """Map-style view with `fetch_sample` items, so DataLoader workers return numpy tuples."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        return fetch_sample(self.dataset, index)


def _torch_batches(dataset: Any, sampler: MicroBatchSampler, cfg: K2Config,
                   device: torch.device) -> tuple[Iterator[dict], Callable[[], None]]:
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        _TorchSamples(dataset), batch_sampler=sampler, collate_fn=_collate,
        num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=cfg.data.prefetch if workers > 0 else None,
        persistent_workers=False,
    )
    it = iter(loader)

    def batches() -> Iterator[dict]:
        for batch in it:
            if device.type != "cpu":
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch

    def close() -> None:
        shutdown = getattr(it, "_shutdown_workers", None)  # stop workers now, not at GC
        if shutdown is not None:
            shutdown()

    return batches(), close


def build_data_iterator(
    cfg: K2Config,
    *,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    split: str = "train",
    device: Optional[torch.device] = None,
    summary: Optional[DataSummary] = None,
) -> DataIterator:
    """This DP rank's micro-batches of `split`, starting after `consumed_samples` global samples.

    Checks the data first (`check_data`; pass `summary` to reuse an earlier result), then builds
    megatron's datasets — collective when torch.distributed is initialized: call it on every
    rank. `device`: where batches land (default: the current CUDA device, else CPU).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    summary = summary if summary is not None else check_data(cfg)
    dataset = build_datasets(cfg, summary)[split]
    if dataset is None:
        raise DataError(f"data.split: {cfg.data.split!r} gives the {split} split no data")
    sampler = MicroBatchSampler(len(dataset), consumed_samples, cfg.train.micro_batch_size,
                                dp_rank, dp_size)
    device = device if device is not None else platform.device()
    backend = resolve_loader(cfg)
    if backend == "dali":
        from k2mcore.data.dali_loader import dali_batches

        batches, close = dali_batches(dataset, sampler, cfg, device)
    else:
        batches, close = _torch_batches(dataset, sampler, cfg, device)
    return DataIterator(batches, sampler, backend, close)
