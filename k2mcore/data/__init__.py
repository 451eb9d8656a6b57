"""Data: tokenizers, preprocessing, megatron datasets and blends, DALI/torch loaders; chat data
(`encode_chat`, `preprocess_chat`, `build_chat_datasets`: conversations rendered by the
tokenizer's chat template, loss on the assistant tokens; `PackedChatDataset` and
`packing_efficiency` for data.packing).

The trainer calls `check_data(cfg)` (optional, early, one-line errors) and
`build_data_iterator(cfg, dp_rank=, dp_size=, consumed_samples=)`. Names resolve lazily, so
`import k2mcore.data.blend` (used by config validation) pulls in neither torch nor megatron.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "k2mcore.errors",
    "parse_blend": "k2mcore.data.blend",
    "parse_split": "k2mcore.data.blend",
    "load_tokenizer": "k2mcore.data.tokenizers",
    "train_k2_bpe": "k2mcore.data.tokenizers",
    "Tokenizer": "k2mcore.data.tokenizers",
    "preprocess": "k2mcore.data.preprocess",
    "check_data": "k2mcore.data.datasets",
    "build_datasets": "k2mcore.data.datasets",
    "resolve_path": "k2mcore.data.datasets",
    "DataSummary": "k2mcore.data.datasets",
    "build_data_iterator": "k2mcore.data.loaders",
    "DataIterator": "k2mcore.data.batches",
    "MicroBatchSampler": "k2mcore.data.batches",
    "dali_available": "k2mcore.data.loaders",
    "encode_chat": "k2mcore.data.chat.encoding",
    "load_chat_tokenizer": "k2mcore.data.chat.encoding",
    "preprocess_chat": "k2mcore.data.chat.preprocess",
    "ChatDataset": "k2mcore.data.chat.dataset",
    "PackedChatDataset": "k2mcore.data.chat.dataset",
    "packing_efficiency": "k2mcore.data.chat.packing",
    "build_chat_datasets": "k2mcore.data.chat.dataset",
    "check_chat_dataset": "k2mcore.data.chat.dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
