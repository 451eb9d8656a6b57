"""The context-parallel split against megatron's rule written out by hand: the sequence in
2·cp equal chunks, rank r keeping chunks r and 2cp−1−r (in that order)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from k2mcore.parallel.context import chunk_ids, global_order, query_chunks, split_batch


class _Group:
    """Stands in for a CP process group: megatron's split asks only its size and rank."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.fixture
def fake_groups(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: group.size())
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group.rank())


def _by_hand(seq: list, cp: int, rank: int) -> list:
    c = len(seq) // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return seq[first * c:(first + 1) * c] + seq[second * c:(second + 1) * c]


@pytest.mark.parametrize("cp", [2, 4])
def test_split_batch_is_megatrons_load_balanced_split(fake_groups, cp):
    seq_len, mbs = 16, 2
    tokens = torch.arange(mbs * seq_len).view(mbs, seq_len)
    batch = {"tokens": tokens, "labels": tokens + 1000, "loss_mask": (tokens % 3 == 0).float(),
             "position_ids": torch.arange(seq_len).expand(mbs, -1), "extra": "kept"}
    seen = []
    for rank in range(cp):
        part = split_batch(batch, _Group(cp, rank))
        assert part["extra"] == "kept"
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            for row in range(mbs):
                want = _by_hand(batch[key][row].tolist(), cp, rank)
                assert part[key][row].tolist() == want, (rank, key, row)
        seen += part["tokens"][0].tolist()
    assert sorted(seen) == list(range(seq_len))  # every token on exactly one rank


def test_split_batch_keeps_the_batch_at_cp1():
    batch = {"tokens": torch.arange(8)[None]}
    assert split_batch(batch, None) is batch
    assert split_batch(batch, _Group(1, 0)) is batch


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_query_chunks_are_the_split_s_global_positions(cp):
    seq = 24 if cp != 4 else 32
    for rank in range(cp):
        chunks = query_chunks(seq // cp, cp, rank)
        positions = torch.cat([torch.arange(c.global_start, c.global_end) for c in chunks])
        assert positions.tolist() == _by_hand(list(range(seq)), cp, rank)
        assert [c.local_start for c in chunks] == ([0] if cp == 1 else [0, seq // cp // 2])


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_global_order_undoes_the_gather(cp):
    seq = 8 * cp
    gathered = sum((_by_hand(list(range(seq)), cp, r) for r in range(cp)), [])
    assert torch.tensor(gathered)[global_order(seq // cp, cp)].tolist() == list(range(seq))
    assert chunk_ids(cp, 0) == (0, 2 * cp - 1)
