"""Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`): read, check, describe.

Megatron's own reader asserts on a bad header and never looks at the token values, so a truncated
file, an empty document or a token id past the embedding table surfaces as an AssertionError or
an index error mid-training. `check_indexed_dataset` finds each up front, in one line that names
the file.

The .idx layout (megatron.core.datasets.indexed_dataset._IndexWriter): 9-byte magic, u64 version
(1), u8 dtype code, u64 sequence count S, u64 document count D, then int32[S] sequence lengths,
int64[S] byte offsets into the .bin, int64[D] document boundaries (indices into the sequences,
0 first, S last).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from k2mcore.errors import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = 9 + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}
_SCAN_CHUNK = 1 << 24  # tokens per max/min pass (64 MiB of int32)


@dataclass
class IndexInfo:
    prefix: str
    dtype: type
    sequence_lengths: np.ndarray  # int32[S]
    document_indices: np.ndarray  # int64[D], D = documents + 1

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def meta_path(prefix: str) -> str:
    """Our sidecar (tokenizer fingerprint, counts); megatron ignores it, data without it is fine."""
    return prefix + ".json"


def read_index(prefix: str, key: str = "data.blend") -> IndexInfo:
    """Parse and cross-check `<prefix>.idx` against `<prefix>.bin`."""
    idx, bin_ = idx_path(prefix), bin_path(prefix)
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise DataError(f"{key}: {path} not found (dataset prefix {prefix!r})")
    raw = np.fromfile(idx, dtype=np.uint8)
    if raw.size < _HEADER or raw[:9].tobytes() != _MAGIC:
        raise DataError(f"{key}: {idx} is not a megatron .idx file (bad header)")
    version, code, seqs, docs = struct.unpack("<QBQQ", raw[9:_HEADER].tobytes())
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{key}: {idx}: unsupported version {version} or dtype code {code}")
    expected = _HEADER + 4 * seqs + 8 * seqs + 8 * docs
    if raw.size not in (expected, expected + seqs):  # + int8 modes for multimodal data
        raise DataError(
            f"{key}: {idx} is corrupt: {raw.size} bytes, header implies {expected} "
            f"({seqs} sequences, {docs} document boundaries)"
        )
    off = _HEADER
    lengths = raw[off:off + 4 * seqs].view(np.int32)
    off += 4 * seqs
    pointers = raw[off:off + 8 * seqs].view(np.int64)
    off += 8 * seqs
    doc_idx = raw[off:off + 8 * docs].view(np.int64)
    dtype = _DTYPES[code]
    itemsize = np.dtype(dtype).itemsize
    if docs < 1 or doc_idx[0] != 0 or doc_idx[-1] != seqs or np.any(np.diff(doc_idx) < 0):
        raise DataError(f"{key}: {idx} is corrupt: document boundaries are not 0..{seqs}")
    if np.any(lengths < 0):
        raise DataError(f"{key}: {idx} is corrupt: negative sequence length")
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    if seqs and (pointers[0] != 0 or np.any(pointers[1:] != ends[:-1])):
        raise DataError(f"{key}: {idx} is corrupt: sequence offsets do not follow the lengths")
    bin_bytes = os.path.getsize(bin_)
    want = int(ends[-1]) if seqs else 0
    if bin_bytes != want:
        raise DataError(
            f"{key}: {bin_} has {bin_bytes} bytes but {idx} describes {want} "
            f"(truncated, or the two files come from different runs)"
        )
    return IndexInfo(prefix, dtype, lengths, doc_idx)


def token_range(prefix: str, dtype: type, cache_dir: Optional[str]) -> tuple[int, int]:
    """(min, max) token id of `<prefix>.bin`, cached by path/size/mtime: a full scan reads the
    whole file (about a second per GB), once per file version, not once per run."""
    path = os.path.abspath(bin_path(prefix))
    st = os.stat(path)
    stamp = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = None
    if cache_dir:
        name = hashlib.sha1(path.encode()).hexdigest()[:20] + ".json"
        cache = Path(cache_dir) / "token_range" / name
        try:
            data = json.loads(cache.read_text())
            if all(data.get(k) == v for k, v in stamp.items()):
                return int(data["min"]), int(data["max"])
        except (OSError, ValueError, KeyError):
            pass
    tokens = np.memmap(path, dtype=dtype, mode="r") if st.st_size else np.zeros(0, dtype)
    lo, hi = 0, -1
    for start in range(0, tokens.shape[0], _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    del tokens
    if cache is not None:
        try:  # atomic: ranks may scan the same file at once
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({**stamp, "min": lo, "max": hi}, f)
            os.replace(tmp, cache)
        except OSError:
            pass
    return lo, hi


def check_indexed_dataset(
    prefix: str,
    *,
    vocab_size: int,
    key: str = "data.blend",
    cache_dir: Optional[str] = None,
    tokenizer_fingerprint: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
) -> IndexInfo:
    """All checks on one dataset: files, structure, empty documents, token range, tokenizer."""
    info = read_index(prefix, key)
    idx = idx_path(prefix)
    if info.num_documents == 0 or info.num_tokens == 0:
        raise DataError(f"{key}: {idx} holds no tokens ({info.num_documents} documents)")
    empty_seq = np.flatnonzero(info.sequence_lengths == 0)
    csum = np.concatenate([[0], np.cumsum(info.sequence_lengths, dtype=np.int64)])
    doc_tokens = csum[info.document_indices[1:]] - csum[info.document_indices[:-1]]
    empty_doc = np.flatnonzero(doc_tokens == 0)
    if empty_doc.size or empty_seq.size:
        which = (f"document {int(empty_doc[0])}" if empty_doc.size
                 else f"sequence {int(empty_seq[0])}")
        count = max(empty_doc.size, empty_seq.size)
        raise DataError(
            f"{key}: {idx}: {which} is empty (0 tokens; {count} empty in all) — "
            f"re-run k2m-preprocess, which drops empty documents"
        )
    lo, hi = token_range(prefix, info.dtype, cache_dir)
    if lo < 0:
        raise DataError(f"{key}: {bin_path(prefix)}: negative token id {lo}")
    if hi >= vocab_size:
        raise DataError(
            f"{key}: {bin_path(prefix)}: token id {hi} >= model.vocab_size={vocab_size} "
            f"(tokenized with a larger vocabulary?)"
        )
    meta = read_meta(prefix)
    if tokenizer_fingerprint and meta and meta.get("tokenizer", {}).get("fingerprint"):
        made_with = meta["tokenizer"]
        if made_with["fingerprint"] != tokenizer_fingerprint:
            raise DataError(
                f"{key}: {bin_path(prefix)} was tokenized with {made_with.get('path')} "
                f"(fingerprint {made_with['fingerprint']}, vocab {made_with.get('vocab_size')}) "
                f"but data.tokenizer={tokenizer_path} has fingerprint {tokenizer_fingerprint} "
                f"(tokenizer/vocab mismatch)"
            )
    return info


def read_meta(prefix: str) -> Optional[dict]:
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise DataError(f"data.blend: {path}: not valid JSON") from None


def write_meta(prefix: str, meta: dict) -> None:
    Path(meta_path(prefix)).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
