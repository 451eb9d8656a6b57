"""`k2m-preprocess`: jsonl or plain text -> megatron indexed datasets, one per JSON key.

Flags follow Megatron-LM's tools/preprocess_data.py where they overlap (`--input`,
`--output-prefix`, `--json-keys`, `--append-eod`, `--workers`, `--log-interval`); the outputs
are named as megatron names them, `<prefix>_<key>_document.{bin,idx}`, written through
megatron-core's IndexedDatasetBuilder. Two additions: `--tokenizer PATH` (a tokenizer.json or a
K2-style tiktoken file) and plain-text input. Empty documents are dropped (megatron keeps them as
zero-length sequences, which the data checks reject). A `<...>_document.json` sidecar records the
tokenizer's fingerprint so training can refuse data made with another tokenizer. Conversations
(`--chat`: token ids + assistant loss masks) are k2mcore.data.chat.preprocess's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from k2mcore.data.indexed import write_meta
from k2mcore.data.pipeline import (
    DatasetWriter,
    Item,
    PipelineStats,
    encoded,
    expand_inputs,
    json_object,
    read_items,
    token_dtype,
)
from k2mcore.data.tokenizers import Tokenizer, load_tokenizer
from k2mcore.errors import DataError

TEXT_MODES = ("paragraph", "line", "file")


@dataclass
class PreprocessStats(PipelineStats):
    documents: int = 0  # written, per key summed
    skipped_empty: int = 0

    @property
    def docs_per_s(self) -> float:
        return self.per_second(self.documents)


# --- encoding (in worker processes) ------------------------------------------------------------
_TOKENIZER: Optional[Tokenizer] = None
_KEYS: tuple[str, ...] = ("text",)
_EOD: Optional[int] = None
_DTYPE: type = np.int32


def _init_worker(tokenizer: Tokenizer, keys: tuple[str, ...], eod: Optional[int],
                 dtype: type) -> None:
    global _TOKENIZER, _KEYS, _EOD, _DTYPE
    _TOKENIZER, _KEYS, _EOD, _DTYPE = tokenizer, keys, eod, dtype


def _encode(item: Item) -> tuple[list[Optional[np.ndarray]], int]:
    """-> (one token array per key, None for an empty text; bytes consumed)."""
    path, lineno, raw, kind = item
    if kind == "json":
        doc = json_object(raw, f"{path}:{lineno}")
        texts = []
        for key in _KEYS:
            if key not in doc:
                raise DataError(
                    f"{path}:{lineno}: no key {key!r} (--json-keys; this line has "
                    f"{', '.join(map(repr, doc)) or 'no keys'})"
                )
            if not isinstance(doc[key], str):
                kind = type(doc[key]).__name__
                raise DataError(f"{path}:{lineno}: {key!r} is a {kind}, not text")
            texts.append(doc[key])
    else:
        try:
            texts = [raw.decode("utf-8")] * len(_KEYS)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
    out: list[Optional[np.ndarray]] = []
    for text in texts:
        if not text.strip():
            out.append(None)
            continue
        ids = _TOKENIZER.encode(text)
        if _EOD is not None:
            ids.append(_EOD)
        out.append(np.asarray(ids, dtype=_DTYPE))  # the file's dtype: least bytes to ship back
    return out, len(raw)


# --- driver -----------------------------------------------------------------------------------
def output_prefix(prefix: str, key: str) -> str:
    """Megatron's naming: `<output-prefix>_<json key>_document`."""
    return f"{prefix}_{key}_document"


def preprocess(
    inputs: Sequence[str],
    output_prefix_: str,
    tokenizer: str,
    *,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    input_format: str = "auto",
    text_mode: str = "paragraph",
    progress: bool = True,
    chunk_size: int = 256,  # documents per task sent to a worker (IPC amortised)
) -> PreprocessStats:
    """Tokenize `inputs` into `<output_prefix_>_<key>_document.{bin,idx}` per key."""
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, key="--tokenizer")
    eod = None
    if append_eod:
        if tok.eod is None:
            raise DataError(
                f"--append-eod: {tokenizer} has no end-of-document token "
                f"(looked for <|endoftext|>, [EOS], </s>, ...)"
            )
        eod = tok.eod
    keys = tuple(json_keys)
    dtype = token_dtype(tok.vocab_size)
    prefixes = [output_prefix(output_prefix_, k) for k in keys]
    stats = PreprocessStats(outputs=prefixes)
    per_key_docs = [0] * len(keys)
    per_key_tokens = [0] * len(keys)

    def rate(elapsed: float) -> str:
        return (f"{sum(per_key_docs) / elapsed:.0f} docs/s, "
                f"{sum(per_key_tokens) / elapsed / 1e3:.1f}k tok/s")

    items = read_items(paths, input_format, text_mode)
    with DatasetWriter(prefixes, [dtype] * len(keys)) as out, encoded(
            paths, items, _init_worker, (tok, keys, eod, dtype), _encode, workers=workers,
            chunk_size=chunk_size, progress=progress, rate=rate) as results:
        for arrays, nbytes in results:
            for k, ids in enumerate(arrays):
                if ids is None:
                    stats.skipped_empty += 1
                    continue
                out.add(k, ids)
                per_key_docs[k] += 1
                per_key_tokens[k] += ids.size
            stats.bytes += nbytes
        for k, n in enumerate(per_key_docs):
            if n == 0:
                raise DataError(
                    f"--input: no non-empty {keys[k]!r} documents in {', '.join(paths)}")
        stats.seconds = results.elapsed()
    stats.documents, stats.tokens = sum(per_key_docs), sum(per_key_tokens)
    meta_tok = {**tok.describe(), "path": tok.name}  # the fingerprint identifies it
    out.commit()
    for k, p in enumerate(prefixes):
        write_meta(p, {
            "tokenizer": meta_tok, "append_eod": append_eod, "json_key": keys[k],
            "documents": per_key_docs[k], "tokens": per_key_tokens[k],
            "inputs": [os.path.basename(x) for x in paths],
        })
    return stats
