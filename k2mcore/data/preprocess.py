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

import glob
import gzip
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

import numpy as np

from k2mcore.data.indexed import write_meta
from k2mcore.data.tokenizers import Tokenizer, load_tokenizer
from k2mcore.errors import DataError

PROG = "k2m-preprocess"
TEXT_MODES = ("paragraph", "line", "file")


@dataclass
class PreprocessStats:
    documents: int = 0  # written, per key summed
    tokens: int = 0
    skipped_empty: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # dataset prefixes written

    @property
    def docs_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# --- reading ----------------------------------------------------------------------------------
def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json", ".ndjson"))


# A work item: (file, line number, raw bytes, kind). Parsing happens in the workers.
_Item = tuple[str, int, bytes, str]


def read_items(paths: Sequence[str], fmt: str, text_mode: str) -> Iterator[_Item]:
    for path in paths:
        with _open(path) as f:
            if _is_jsonl(path, fmt):
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield path, lineno, line, "json"
            elif text_mode == "file":
                yield path, 1, f.read(), "text"
            elif text_mode == "line":
                for lineno, line in enumerate(f, 1):
                    yield path, lineno, line, "text"
            else:  # paragraphs: documents separated by blank lines
                buf: list[bytes] = []
                start = 1
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        if not buf:
                            start = lineno
                        buf.append(line)
                    elif buf:
                        yield path, start, b"".join(buf), "text"
                        buf = []
                if buf:
                    yield path, start, b"".join(buf), "text"


# --- encoding (in worker processes) ------------------------------------------------------------
_TOKENIZER: Optional[Tokenizer] = None
_KEYS: tuple[str, ...] = ("text",)
_EOD: Optional[int] = None
_DTYPE: type = np.int32


def _init_worker(tokenizer: Tokenizer, keys: tuple[str, ...], eod: Optional[int],
                 dtype: type) -> None:
    global _TOKENIZER, _KEYS, _EOD, _DTYPE
    _TOKENIZER, _KEYS, _EOD, _DTYPE = tokenizer, keys, eod, dtype


def _encode(item: _Item) -> tuple[list[Optional[np.ndarray]], int]:
    """-> (one token array per key, None for an empty text; bytes consumed)."""
    path, lineno, raw, kind = item
    if kind == "json":
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}")
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


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"--input: {pattern!r} matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise DataError(f"--input: {path} not found")
        paths += matches
    return paths


def discard_partial(builders: list, prefixes: list) -> None:
    """After a failure: close the builders' files and remove their .tmp outputs, so no
    half-written dataset is left under a final name."""
    for b, p in zip(builders, prefixes):
        b.data_file.close()
        for tmp in (p + ".bin.tmp", p + ".idx.tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)


def commit_outputs(builders: list, prefixes: list) -> None:
    """Write every builder's index, then move all .tmp files to their final names (a reader
    never sees one dataset of a pair without the other's index)."""
    for b, p in zip(builders, prefixes):
        b.finalize(p + ".idx.tmp")
    for p in prefixes:
        os.replace(p + ".bin.tmp", p + ".bin")
        os.replace(p + ".idx.tmp", p + ".idx")


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
    with warnings.catch_warnings():  # megatron's import warns about absent TE/Apex, not ours
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

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
    dtype = DType.optimal_dtype(tok.vocab_size)  # megatron's choice: uint16 below 65500
    prefixes = [output_prefix(output_prefix_, k) for k in keys]
    Path(output_prefix_).parent.mkdir(parents=True, exist_ok=True)
    # write under temporary names: a crash never leaves a .bin/.idx pair that looks complete
    builders = [IndexedDatasetBuilder(p + ".bin.tmp", dtype=dtype) for p in prefixes]
    stats = PreprocessStats(outputs=prefixes)
    per_key_docs = [0] * len(keys)
    per_key_tokens = [0] * len(keys)
    # the bar counts bytes read; a .gz input's file size is not that, so no total (nor ETA) then
    gz = any(p.endswith(".gz") for p in paths)
    total_bytes = None if gz else sum(os.path.getsize(p) for p in paths)

    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=PROG,
               disable=not progress, file=sys.stderr, smoothing=0.1)
    start = time.perf_counter()
    pool = None
    try:
        if workers > 1:
            # fork shares the loaded tokenizer; tokenizers' own threads stay off in the workers
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = get_context("fork").Pool(workers, _init_worker, (tok, keys, eod, dtype))
            results = pool.imap(_encode, read_items(paths, input_format, text_mode), chunk_size)
        else:
            _init_worker(tok, keys, eod, dtype)
            results = map(_encode, read_items(paths, input_format, text_mode))
        last = start
        for arrays, nbytes in results:
            for k, ids in enumerate(arrays):
                if ids is None:
                    stats.skipped_empty += 1
                    continue
                builders[k].add_document(ids, [ids.size])
                per_key_docs[k] += 1
                per_key_tokens[k] += ids.size
            stats.bytes += nbytes
            bar.update(nbytes)
            now = time.perf_counter()
            if progress and now - last > 0.5:
                el = now - start
                bar.set_postfix_str(f"{sum(per_key_docs) / el:.0f} docs/s, "
                                    f"{sum(per_key_tokens) / el / 1e3:.1f}k tok/s", refresh=False)
                last = now
        for k, n in enumerate(per_key_docs):
            if n == 0:
                raise DataError(
                    f"--input: no non-empty {keys[k]!r} documents in {', '.join(paths)}")
    except BaseException:
        discard_partial(builders, prefixes)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    stats.seconds = time.perf_counter() - start
    stats.documents, stats.tokens = sum(per_key_docs), sum(per_key_tokens)
    meta_tok = {**tok.describe(), "path": tok.name}  # the fingerprint identifies it
    commit_outputs(builders, prefixes)
    for k, p in enumerate(prefixes):
        write_meta(p, {
            "tokenizer": meta_tok, "append_eod": append_eod, "json_key": keys[k],
            "documents": per_key_docs[k], "tokens": per_key_tokens[k],
            "inputs": [os.path.basename(x) for x in paths],
        })
    return stats
