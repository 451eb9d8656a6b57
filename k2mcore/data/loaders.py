"""Micro-batch iterators over megatron's datasets: picks the backend and builds the iterator.

Both backends (DALI, `dali_loader.py`; torch's DataLoader, `torch_loader.py`) draw the same sample
indices (`MicroBatchSampler`) and read them with the same `fetch_sample`, so for a given (config,
dp rank, consumed samples) they yield identical batches; the choice is about where the work runs
(DALI: its worker processes and prefetch queue, outputs on the GPU when there is one; torch:
DataLoader workers, pinned memory).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from k2mcore import platform
from k2mcore.config.schema import K2Config
from k2mcore.data.batches import DataIterator, MicroBatchSampler
from k2mcore.data.datasets import SPLITS, DataSummary, build_datasets, check_data
from k2mcore.errors import DataError


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
        from k2mcore.data.torch_loader import torch_batches

        batches, close = torch_batches(dataset, sampler, cfg, device)
    return DataIterator(batches, sampler, backend, close)
