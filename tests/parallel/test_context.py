"""The context-parallel split against megatron's rule written out by hand: the sequence in
2·cp equal chunks, rank r keeping chunks r and 2cp−1−r (in that order); packed, the same per
document (megatron's THD split, which it takes from Transformer-Engine)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from k2mcore.parallel.context import (
    chunk_ids,
    global_order,
    packed_global_order,
    packed_query_chunks,
    query_chunks,
    split_batch,
)


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


def _packed_by_hand(bounds: list, cp: int, rank: int) -> list:
    """Per document [a, b): its 2·cp chunks, chunk r then chunk 2cp−1−r."""
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out += _by_hand(list(range(a, b)), cp, rank)
    return out


# documents of 4 tokens at CP2 (shorter than 2·cp before padding: 1 or 3 real tokens), of 12,
# and a row-end padding segment; two rows of 16 end to end (the second row's first document
# starts right after the first row's padding)
PACKED = {2: [0, 4, 16, 20, 24, 32], 4: [0, 8, 32, 40, 48, 64]}


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_split_is_per_document(fake_groups, cp):
    from k2mcore.parallel.context import packed_local_indices, split_packed_batch

    bounds = PACKED[cp]
    t = bounds[-1]
    batch = {"tokens": torch.arange(t)[None], "labels": torch.arange(t)[None] + 100,
             "loss_mask": torch.ones(1, t), "position_ids": torch.arange(t)[None]}
    seen = []
    for rank in range(cp):
        want = _packed_by_hand(bounds, cp, rank)
        assert packed_local_indices(bounds, cp, rank).tolist() == want
        part = split_packed_batch(batch, bounds, _Group(cp, rank))
        assert part["tokens"][0].tolist() == want
        assert part["labels"][0].tolist() == [i + 100 for i in want]
        chunks = packed_query_chunks(bounds, cp, rank)
        rows = torch.cat([torch.arange(c.global_start, c.global_end) for c in chunks])
        assert rows.tolist() == want  # each chunk's global positions, in local order
        for c in chunks:  # a chunk attends from its own document's first token
            assert max(a for a in bounds if a <= c.global_start) == c.key_start
        seen += want
    assert sorted(seen) == list(range(t))
    gathered = sum((_packed_by_hand(bounds, cp, r) for r in range(cp)), [])
    assert torch.tensor(gathered)[packed_global_order(bounds, cp)].tolist() == list(range(t))


def test_packed_documents_must_be_padded_to_2cp():
    from k2mcore.parallel.context import packed_local_indices

    with pytest.raises(ValueError, match="a document of 6 tokens .at 4. is not a multiple of "
                                         "2\\*cp=4"):
        packed_local_indices([0, 4, 10, 12], 2, 0)
