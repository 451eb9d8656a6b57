"""The skeleton both preprocessing pipelines (text: k2mcore.data.preprocess; chat:
k2mcore.data.chat.preprocess) run on: input files expanded and read into work items (jsonl lines
or text documents, .gz too), items encoded in order by a pool of forked workers, a progress bar
over the bytes read, and megatron indexed datasets written under temporary names until every one
of them is complete.

Each pipeline brings its worker's `init`/`encode` pair (module-level functions, so that a forked
worker finds them) and what it counts; the rest is here.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

from k2mcore.errors import DataError

PROG = "k2m-preprocess"


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """`--input` patterns -> the files, in order; one line naming a pattern or file that is not
    there."""
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


@dataclass
class PipelineStats:
    """What every pipeline counts; each adds its own counts."""

    tokens: int = 0  # written
    bytes: int = 0  # read
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # dataset prefixes written

    def per_second(self, count: int) -> float:
        return count / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.per_second(self.tokens)


def _indexed_dataset() -> Any:
    with warnings.catch_warnings():  # megatron's import warns about absent TE/Apex, not ours
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    """megatron's choice of token dtype for a vocabulary: uint16 below 65500, else int32."""
    return _indexed_dataset().DType.optimal_dtype(vocab_size)


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json", ".ndjson"))


# A work item: (file, line number, raw bytes, kind). Parsing happens in the workers.
Item = tuple[str, int, bytes, str]


def read_items(paths: Sequence[str], fmt: str, text_mode: str) -> Iterator[Item]:
    """The work items of `paths` in order: a jsonl file's non-blank lines (`fmt` "jsonl", or
    "auto" and a .jsonl/.json/.ndjson name, .gz too), else text documents by `text_mode`:
    paragraphs (separated by blank lines), lines, or whole files."""
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


def json_object(raw: bytes, where: str) -> dict:
    """One jsonl line as a dict, or one line naming `where` (file:line) and what is wrong."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


class DatasetWriter:
    """megatron IndexedDatasetBuilders, one per output prefix, writing `<prefix>.bin.tmp`.

    `commit()` writes every index, then moves all files to their final names, so a reader never
    sees a dataset of a set without the others' indexes; `discard()` (also on leaving a `with`
    block by an exception) removes the temporary files, so a crash never leaves a .bin/.idx pair
    that looks complete."""

    def __init__(self, prefixes: Sequence[str], dtypes: Sequence[Any]) -> None:
        builder = _indexed_dataset().IndexedDatasetBuilder
        self.prefixes = list(prefixes)
        for prefix in self.prefixes:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.builders = [builder(p + ".bin.tmp", dtype=d)
                         for p, d in zip(self.prefixes, dtypes)]

    def add(self, index: int, array: Any) -> None:
        """One document (a 1-D array) to dataset `index`."""
        self.builders[index].add_document(array, [array.size])

    def commit(self) -> None:
        for b, p in zip(self.builders, self.prefixes):
            b.finalize(p + ".idx.tmp")
        for p in self.prefixes:
            os.replace(p + ".bin.tmp", p + ".bin")
            os.replace(p + ".idx.tmp", p + ".idx")

    def drop(self, index: int) -> None:
        """Write no dataset `index` after all (a file kind the input turned out not to have)."""
        b, p = self.builders.pop(index), self.prefixes.pop(index)
        b.data_file.close()
        if os.path.exists(p + ".bin.tmp"):
            os.remove(p + ".bin.tmp")

    def discard(self) -> None:
        for b, p in zip(self.builders, self.prefixes):
            b.data_file.close()
            for tmp in (p + ".bin.tmp", p + ".idx.tmp"):
                if os.path.exists(tmp):
                    os.remove(tmp)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self.discard()


class Encoded:
    """The encoder's results in input order; each result's last element is the bytes it read,
    which the progress bar counts. `rate(elapsed)` gives the bar's speed text."""

    def __init__(self, results: Iterable, bar: Any, rate: Callable[[float], str],
                 progress: bool, start: float) -> None:
        self._results, self._bar, self._rate, self._progress = results, bar, rate, progress
        self.start = start  # before the workers were started: their start-up counts

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __iter__(self) -> Iterator:
        last = self.start
        for result in self._results:
            yield result
            self._bar.update(result[-1])
            now = time.perf_counter()
            if self._progress and now - last > 0.5:
                self._bar.set_postfix_str(self._rate(now - self.start), refresh=False)
                last = now


@contextmanager
def encoded(paths: Sequence[str], items: Iterable, init: Callable[..., None],
            init_args: tuple, encode: Callable[[Any], tuple], *, workers: int,
            chunk_size: int, progress: bool,
            rate: Callable[[float], str]) -> Iterator[Encoded]:
    """`encode` over `items`, in order: in this process (`workers` 1) or in `workers` forked
    processes that each ran `init(*init_args)` (fork shares the loaded tokenizer; tokenizers' own
    threads stay off in them). The bar counts bytes read; a .gz input's file size is not that, so
    it has no total (nor ETA) then. The pool is ended on leaving, whatever happened."""
    from tqdm import tqdm

    start = time.perf_counter()
    gz = any(p.endswith(".gz") for p in paths)
    total: Optional[int] = None if gz else sum(os.path.getsize(p) for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=PROG,
               disable=not progress, file=sys.stderr, smoothing=0.1)
    pool = None
    try:
        if workers > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = get_context("fork").Pool(workers, init, init_args)
            results: Iterable = pool.imap(encode, items, chunk_size)
        else:
            init(*init_args)
            results = map(encode, items)
        yield Encoded(results, bar, rate, progress, start)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
