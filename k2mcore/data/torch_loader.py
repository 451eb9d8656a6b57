"""The torch backend: a DataLoader over megatron's dataset (`data.num_workers` worker
processes, pinned memory on GPU), drawing the samples `MicroBatchSampler` assigns."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from k2mcore.config.schema import K2Config
from k2mcore.data.batches import FIELDS, MicroBatchSampler, fetch_sample


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


def torch_batches(dataset: Any, sampler: MicroBatchSampler, cfg: K2Config,
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
