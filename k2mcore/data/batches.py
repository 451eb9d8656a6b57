"""What both loaders share: the batch fields and dtypes, which samples each data-parallel rank
draws (`MicroBatchSampler`), how one sample is read (`fetch_sample`), and the iterator the
trainer consumes (`DataIterator`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from k2mcore.errors import DataError

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
FIELD_DTYPES = {"tokens": np.int64, "labels": np.int64, "loss_mask": np.float32,
                "position_ids": np.int64}


@dataclass(frozen=True)
class MicroBatchSampler:
    """Megatron-LM's MegatronPretrainingSampler (megatron/training/datasets/data_samplers.py,
    not part of megatron-core), as a pure function of the micro-batch number.

    The global sample stream is the dataset in index order (megatron's datasets are already
    shuffled); each run of `micro_batch_size * dp_size` samples is one micro-batch on every DP
    rank, rank r taking slice [r*mbs, (r+1)*mbs). A run resumed at `consumed_samples` (a multiple
    of mbs*dp, which global-batch steps always are) therefore continues with exactly the samples
    the uninterrupted run would have drawn, and DP ranks never share a sample. The last partial
    micro-batch is dropped, as megatron does.
    """

    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={self.dp_rank} not in [0, dp_size={self.dp_size})")
        if self.consumed_samples % (self.micro_batch_size * self.dp_size):
            raise DataError(
                f"consumed_samples={self.consumed_samples} is not a multiple of "
                f"micro_batch_size*dp_size={self.micro_batch_size * self.dp_size}"
            )
        if self.consumed_samples > self.total_samples:
            raise DataError(
                f"consumed_samples={self.consumed_samples} exceeds the {self.total_samples} "
                f"samples built (was train.iters or train.global_batch_size lowered?)"
            )

    @property
    def stride(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro-batches left for this rank."""
        return (self.total_samples - self.consumed_samples) // self.stride

    def indices(self, i: int) -> list[int]:
        """Dataset indices of this rank's `i`-th remaining micro-batch."""
        start = self.consumed_samples + i * self.stride + self.dp_rank * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        return (self.indices(i) for i in range(len(self)))


def fetch_sample(dataset: Any, index: int) -> tuple[np.ndarray, ...]:
    """One sample as numpy arrays in FIELDS order (megatron returns torch tensors and, for a
    blend, a dataset id; the attention mask is not built: the model makes the causal mask)."""
    sample = dataset[index]
    return tuple(np.asarray(sample[k], dtype=FIELD_DTYPES[k]) for k in FIELDS)


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
