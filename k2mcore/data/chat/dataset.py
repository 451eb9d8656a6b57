"""Chat datasets for training: one conversation per sample, loss on the assistant tokens only.

A chat dataset `PREFIX` is the pair `k2m-preprocess --chat --output-prefix PREFIX` writes:
`PREFIX_input_ids_document` (token ids) and `PREFIX_loss_mask_document` (uint8, 1 on assistant
tokens), with the same document lengths; `data.blend` names `PREFIX` (`assets:sample/stdlib_chat`
for the bundled sample, made with `assets:tokenizer/k2-tiny`).

Sample i is one conversation `ids`, as megatron's GPTDataset shapes a sample:
`tokens = ids[:-1]`, `labels = ids[1:]`, `loss_mask[j]` = the mask of `labels[j]` (float32),
`position_ids = 0..seq_length-1`, each of length `seq_length`; a conversation longer than
`seq_length + 1` tokens is truncated (refused with `truncate=False`), a shorter one padded with
`pad_id` (K2's [PAD]) and `loss_mask` 0 past its end.

`PackedChatDataset` (data.packing): sample i is a row of several conversations, each laid out
as above without its padding, end to end (k2mcore.data.chat.packing.first_fit over the shuffled
conversation stream), then the padding; `position_ids` restart at 0 at every conversation and at
the padding, which is how the trainer finds the documents (k2mcore.model.packing). With context
parallelism each conversation is padded with masked tokens to a multiple of 2·cp (`pad_multiple`),
positions going on through its padding, so that every CP rank holds two equal chunks of it.

Splits follow megatron's GPTDataset over documents: `data.split` ("98,2,0": train, valid, test
weights, normalized) becomes cumulative bookends, and split k gets the contiguous conversations
[round(lo_k * n), round(hi_k * n)); a zero-weight split has no dataset (None). Each split's
conversations are shuffled by `np.random.RandomState([seed, k])`, a new permutation per epoch,
epochs following each other until the requested number of samples (a split's size; None: one
epoch); so the first samples do not depend on how many are requested, and a run that asks for
more samples later sees the same ones first.

The module is plain numpy; the files are read through megatron-core's IndexedDataset (imported
when a dataset is built; megatron imports torch).
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from k2mcore.data.blend import parse_split
from k2mcore.data.indexed import IndexInfo, check_indexed_dataset, idx_path, read_index, token_range
from k2mcore.errors import DataError

from .preprocess import IDS_SUFFIX, MASK_SUFFIX, chat_output_prefixes

SPLITS = ("train", "valid", "test")  # megatron's Split order

Split = Union[str, Sequence[float]]


def chat_prefixes(prefix: str) -> tuple[str, str]:
    """(ids prefix, mask prefix) of the chat dataset `prefix`; the ids prefix itself
    (`..._input_ids_document`) is accepted too."""
    for suffix in (IDS_SUFFIX, MASK_SUFFIX):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return chat_output_prefixes(prefix)


def split_ranges(split: Split, num_documents: int, key: str = "data.split"
                 ) -> list[Optional[tuple[int, int]]]:
    """Megatron's document ranges per split: bookends of the cumulative normalized weights,
    each rounded times the document count; None for a zero-weight split."""
    if isinstance(split, str):
        try:
            weights = parse_split(split, key)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    else:
        total = float(sum(split))
        weights = [w / total for w in split] + [0.0] * (3 - len(split))
    ranges: list[Optional[tuple[int, int]]] = []
    lo = 0.0
    for w in weights:
        hi = lo + w
        if hi <= lo:
            ranges.append(None)
        else:
            ranges.append((int(round(lo * num_documents)), int(round(hi * num_documents))))
        lo = hi
    return ranges


def _epochs(documents: tuple[int, int], seed: int, split_index: int, shuffle: bool = True
            ) -> Iterator[np.ndarray]:
    """Endless epochs of [start, end): each a permutation drawn in turn from
    RandomState([seed, split_index]), or the documents in order."""
    start, end = documents
    n = end - start
    if n <= 0:
        raise ValueError(f"no documents in [{start}, {end})")
    rng = np.random.RandomState([seed, split_index])
    dtype = np.int32 if end < 2**31 else np.int64
    while True:
        order = rng.permutation(n).astype(dtype) if shuffle else np.arange(n, dtype=dtype)
        yield order + dtype(start)


def shuffled_documents(documents: tuple[int, int], num_samples: Optional[int], seed: int,
                       split_index: int = 0) -> np.ndarray:
    """The document of every sample: per epoch a permutation of [start, end), epochs in a row."""
    start, end = documents
    n = end - start
    if n <= 0:
        raise ValueError(f"no documents in [{start}, {end})")
    epochs = _epochs(documents, seed, split_index)
    num_samples = n if num_samples is None else num_samples
    parts = [next(epochs) for _ in range(math.ceil(num_samples / n))]
    order = np.concatenate(parts) if parts else np.zeros(0, np.int32 if end < 2**31 else np.int64)
    return order[:num_samples]


def padded(positions: int, multiple: int) -> int:
    """`positions` rounded up to a multiple of `multiple` (context parallelism's 2·cp)."""
    return -(-positions // multiple) * multiple


def refuse_overlong(prefix: str, lengths: np.ndarray, seq_length: int, *, start: int = 0,
                    where: str = "it", pad_multiple: int = 1) -> None:
    """data.truncate=false: DataError naming the first conversation (`lengths[i]` is
    conversation start + i) whose positions, padded to `pad_multiple` (packing with context
    parallelism), exceed seq_length."""
    positions = np.maximum(lengths.astype(np.int64) - 1, 0)
    over = np.flatnonzero(-(-positions // pad_multiple) * pad_multiple > seq_length)
    if over.size:
        n = int(lengths[over[0]])
        after = (f", {padded(n - 1, pad_multiple)} positions padded to a multiple of "
                 f"2*parallel.cp={pad_multiple}" if pad_multiple > 1 else "")
        raise DataError(
            f"data.truncate: false, but conversation {start + int(over[0])} of {prefix} has "
            f"{n} tokens{after}, more than train.seq_length+1={seq_length + 1} "
            f"({over.size} such in {where}; set data.truncate=true, raise train.seq_length, or "
            f"drop them with k2m-preprocess --max-length {seq_length + 1} --overlong drop)")


class ChatDataset:
    """Samples of one split of a chat dataset: `dataset[i]` -> {tokens, labels, loss_mask,
    position_ids} (numpy, length `seq_length`; batches.FIELDS)."""

    def __init__(self, prefix: str, seq_length: int, *, pad_id: int,
                 documents: Optional[tuple[int, int]] = None, num_samples: Optional[int] = None,
                 seed: int = 0, split_index: int = 0, shuffle: bool = True,
                 truncate: bool = True, pad_multiple: int = 1) -> None:
        with warnings.catch_warnings():  # megatron's import warns about absent TE/Apex
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset

        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        self.prefix = prefix
        self.seq_length = seq_length
        self.pad_id = int(pad_id)
        if pad_multiple < 1 or seq_length % pad_multiple:
            raise DataError(f"pad_multiple={pad_multiple} does not divide "
                            f"train.seq_length={seq_length}")
        self.pad_multiple = pad_multiple  # packed rows: each conversation padded to it
        ids_prefix, mask_prefix = chat_prefixes(prefix)
        for p in (ids_prefix, mask_prefix):
            read_index(p)  # missing or corrupt files: one line, before megatron asserts
        self._ids = IndexedDataset(ids_prefix, mmap=True)
        self._mask = IndexedDataset(mask_prefix, mmap=True)
        n = len(self._ids)
        if len(self._mask) != n:
            raise DataError(f"data.blend: {idx_path(mask_prefix)} has {len(self._mask)} "
                            f"conversations but {idx_path(ids_prefix)} has {n}")
        self.documents = documents if documents is not None else (0, n)
        self.split = SPLITS[split_index] if split_index < len(SPLITS) else str(split_index)
        if not truncate:
            self._refuse_overlong()
        self._build_index(num_samples, seed, split_index, shuffle)

    def _refuse_overlong(self) -> None:
        start, end = self.documents
        refuse_overlong(self.prefix, self._ids.sequence_lengths[start:end], self.seq_length,
                        start=start, where=f"the {self.split} split",
                        pad_multiple=self.pad_multiple)

    def _build_index(self, num_samples: Optional[int], seed: int, split_index: int,
                     shuffle: bool) -> None:
        if shuffle:
            self.doc_index = shuffled_documents(self.documents, num_samples, seed, split_index)
        else:
            start, end = self.documents
            count = end - start if num_samples is None else num_samples
            self.doc_index = start + np.arange(count, dtype=np.int64) % max(end - start, 1)

    def __len__(self) -> int:
        return int(self.doc_index.shape[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return self._row([int(self.doc_index[index])], restart_positions=False)

    def _row(self, docs: Sequence[int], restart_positions: bool) -> dict[str, np.ndarray]:
        """`docs` end to end, each truncated to seq_length + 1 tokens, then the padding."""
        tokens = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        position_ids = np.arange(self.seq_length, dtype=np.int64)
        at = 0
        for doc in docs:
            length = min(int(self._ids.sequence_lengths[doc]), self.seq_length + 1)
            ids = self._ids.get(doc, 0, length).astype(np.int64)
            mask = self._mask.get(doc, 0, length)
            n = max(length - 1, 0)
            tokens[at:at + n] = ids[:-1]
            labels[at:at + n] = ids[1:]
            loss_mask[at:at + n] = mask[1:]
            # packed for context parallelism: masked padding up to a multiple of 2·cp, inside
            # the document (its positions go on)
            n = padded(n, self.pad_multiple) if restart_positions else n
            at += n
            if restart_positions:
                position_ids[at:] -= n  # the next document (or the padding) starts at 0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": position_ids}


class PackedChatDataset(ChatDataset):
    """Rows of packed conversations: `dataset[i]` -> batches.FIELDS of row i (length
    `seq_length`), `position_ids` restarting at 0 at every conversation and at the padding.

    `num_samples` counts rows (the sampler's samples); the conversations are the split's
    shuffled epochs in a row, packed by `first_fit`, so row i does not depend on how many rows
    are built. None: one epoch's conversations (the last rows closed as they are)."""

    def _build_index(self, num_samples: Optional[int], seed: int, split_index: int,
                     shuffle: bool) -> None:
        from .packing import first_fit, positions

        epochs = _epochs(self.documents, seed, split_index, shuffle)
        stream = next(epochs) if num_samples is None else itertools.chain.from_iterable(epochs)
        docs: list[int] = []
        lengths = self._ids.sequence_lengths

        def items() -> Iterator[int]:
            for doc in stream:
                docs.append(int(doc))
                yield padded(positions(int(lengths[doc]), self.seq_length), self.pad_multiple)

        rows = first_fit(items(), self.seq_length, rows=num_samples)
        self.row_offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
        self.row_docs = np.asarray([docs[i] for r in rows for i in r], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.row_offsets.shape[0] - 1)

    def row_documents(self, index: int) -> list[int]:
        """Conversations (indices into the prefix) of row `index`, in order."""
        return [int(d) for d in self.row_docs[self.row_offsets[index]:self.row_offsets[index + 1]]]

    def row_lengths(self, index: int) -> list[int]:
        """Positions of each conversation of row `index`, then of the padding if any."""
        from .packing import positions

        out = [padded(positions(int(self._ids.sequence_lengths[d]), self.seq_length),
                      self.pad_multiple) for d in self.row_documents(index)]
        pad = self.seq_length - sum(out)
        return out + [pad] if pad else out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return self._row(self.row_documents(index), restart_positions=True)


def build_chat_datasets(
    prefix: str,
    seq_length: int,
    split: Split,
    seed: int,
    sizes: Sequence[Optional[int]],
    pad_id: int,
    *,
    packing: bool = False,
    truncate: bool = True,
    pad_multiple: int = 1,
) -> dict[str, Optional[ChatDataset]]:
    """{"train"|"valid"|"test": ChatDataset or None (a zero-weight split)} over the documents
    `split_ranges` gives; `sizes` = samples per split (None: one epoch of its conversations),
    as `datasets.dataset_sizes(cfg)` computes them for the text path. `packing`: samples are
    PackedChatDataset rows; `truncate=False`: a conversation longer than seq_length + 1 tokens
    is refused (DataError naming it). `pad_multiple` (packing with context parallelism, 2·cp):
    each packed conversation is padded with masked tokens to a multiple of it."""
    cls = PackedChatDataset if packing else ChatDataset
    info = read_index(chat_prefixes(prefix)[0])
    ranges = split_ranges(split, info.num_documents)
    out: dict[str, Optional[ChatDataset]] = {}
    for k, (name, docs) in enumerate(zip(SPLITS, ranges)):
        if docs is None:
            out[name] = None
            continue
        if docs[1] <= docs[0]:
            raise DataError(f"data.split: {split!r} leaves the {name} split of {prefix} "
                            f"({info.num_documents} conversations) empty; use fewer splits or "
                            f"more data")
        out[name] = cls(prefix, seq_length, pad_id=pad_id, documents=docs,
                        num_samples=sizes[k], seed=seed, split_index=k, truncate=truncate,
                        pad_multiple=pad_multiple if packing else 1)
    return out


@dataclass
class ChatInfo:
    ids: IndexInfo
    mask: IndexInfo

    @property
    def num_documents(self) -> int:
        return self.ids.num_documents

    @property
    def num_tokens(self) -> int:
        return self.ids.num_tokens

    @property
    def num_loss_tokens(self) -> int:
        return int(np.memmap(self.mask.prefix + ".bin", dtype=np.uint8, mode="r").sum(
            dtype=np.int64))


def check_chat_dataset(prefix: str, *, split: Optional[Split] = None,
                       max_seq_length: Optional[int] = None, pad_multiple: int = 1,
                       **ids_checks: Any) -> ChatInfo:
    """Every check on a chat dataset, one line naming the file: the ids as
    `check_indexed_dataset` checks text data, with its keywords `ids_checks` (vocab_size, key,
    cache_dir, tokenizer_fingerprint, tokenizer_path: files, structure, empty conversations, ids
    >= vocab_size, tokenizer fingerprint); the mask's files and structure, its dtype (uint8) and
    values (0/1), and that it has the ids' conversations and lengths; with `split`, that no
    split with a weight is left without conversations; with `max_seq_length` (data.truncate
    false), that no conversation is longer than max_seq_length + 1 tokens (its positions
    padded to `pad_multiple`, packing with context parallelism, no more than max_seq_length)."""
    ids_prefix, mask_prefix = chat_prefixes(prefix)
    ids = check_indexed_dataset(ids_prefix, **ids_checks)
    key, cache_dir = ids_checks.get("key", "data.blend"), ids_checks.get("cache_dir")
    mask = read_index(mask_prefix, key)
    ids_idx, mask_idx = idx_path(ids_prefix), idx_path(mask_prefix)
    if np.dtype(mask.dtype) != np.uint8:
        raise DataError(f"{key}: {mask_idx} holds {np.dtype(mask.dtype).name}, not a uint8 "
                        f"loss mask")
    if mask.num_documents != ids.num_documents:
        raise DataError(f"{key}: {mask_idx} has {mask.num_documents} conversations but "
                        f"{ids_idx} has {ids.num_documents} (files from different runs?)")
    differ = np.flatnonzero(mask.sequence_lengths != ids.sequence_lengths)
    if differ.size or not np.array_equal(mask.document_indices, ids.document_indices):
        i = int(differ[0]) if differ.size else 0
        raise DataError(
            f"{key}: {mask_idx}: conversation {i} has {int(mask.sequence_lengths[i])} mask "
            f"values but {ids_idx} has {int(ids.sequence_lengths[i])} tokens "
            f"({differ.size} differ; files from different runs?)")
    lo, hi = token_range(mask_prefix, np.uint8, cache_dir)
    if hi > 1:
        raise DataError(f"{key}: {mask_prefix}.bin: loss mask value {hi} (expected 0 or 1)")
    if split is not None:
        for name, docs in zip(SPLITS, split_ranges(split, ids.num_documents)):
            if docs is not None and docs[1] <= docs[0]:
                raise DataError(f"data.split: {split!r} leaves the {name} split of {prefix} "
                                f"({ids.num_documents} conversations) empty; use fewer splits "
                                f"or more data")
    if max_seq_length is not None:
        refuse_overlong(prefix, ids.sequence_lengths, max_seq_length, where="the dataset",
                        pad_multiple=pad_multiple)
    return ChatInfo(ids, mask)
