"""The preprocessing skeleton both pipelines share (k2mcore.data.pipeline): datasets written under
temporary names and committed together or not at all, and encoding in input order whatever the
number of workers, with the pool ended however the caller leaves."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from k2mcore.data.indexed import read_index
from k2mcore.data.pipeline import DatasetWriter, encoded, expand_inputs, token_dtype
from k2mcore.errors import DataError

_OFFSET = 0


def _init(offset: int) -> None:
    global _OFFSET
    _OFFSET = offset


def _encode(item: int) -> tuple[np.ndarray, int]:
    return np.arange(item % 7 + 1, dtype=np.int32) + _OFFSET, 1  # (ids, bytes read)


def test_writer_commits_every_dataset_together(tmp_path):
    prefixes = [str(tmp_path / "out" / "ids"), str(tmp_path / "out" / "mask")]
    with DatasetWriter(prefixes, [np.int32, np.uint8]) as out:
        for n in (3, 1, 4):
            out.add(0, np.arange(n, dtype=np.int32))
            out.add(1, np.ones(n, dtype=np.uint8))
        assert sorted(os.listdir(tmp_path / "out")) == ["ids.bin.tmp", "mask.bin.tmp"]
    out.commit()
    assert sorted(os.listdir(tmp_path / "out")) == ["ids.bin", "ids.idx", "mask.bin", "mask.idx"]
    for prefix in prefixes:
        assert read_index(prefix).sequence_lengths.tolist() == [3, 1, 4]


def test_writer_leaves_nothing_when_the_block_fails(tmp_path):
    prefix = str(tmp_path / "ids")
    with pytest.raises(DataError, match="line 2"):
        with DatasetWriter([prefix], [np.int32]) as out:
            out.add(0, np.arange(5, dtype=np.int32))
            raise DataError("in.jsonl: line 2 is not JSON")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("workers", [1, 3])
def test_encoding_keeps_the_input_order(tmp_path, workers):
    src = tmp_path / "in.txt"
    src.write_text("x" * 40)
    with encoded([str(src)], range(40), _init, (100,), _encode, workers=workers, chunk_size=4,
                 progress=False, rate=lambda s: "") as results:
        got = [ids.tolist() for ids, _ in results]
    assert got == [list(range(100, 100 + i % 7 + 1)) for i in range(40)]


def test_the_pool_ends_when_the_caller_stops_early(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    with pytest.raises(DataError):
        with encoded([str(src)], range(10_000), _init, (0,), _encode, workers=2, chunk_size=1,
                     progress=False, rate=lambda s: "") as results:
            for _ in results:
                raise DataError("stop")
    assert multiprocessing.active_children() == []


def test_inputs_and_token_dtype(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    assert expand_inputs([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl"),
                                                          str(tmp_path / "b.jsonl")]
    with pytest.raises(DataError, match=r"--input: '.*\*\.txt' matches no file"):
        expand_inputs([str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match=r"--input: .*missing\.jsonl not found"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    assert (token_dtype(65_000), token_dtype(163_840)) == (np.uint16, np.int32)
