"""The boxes a rank's flat range of a parameter is saved as (k2mcore.optim.state_boxes): hand-
computed cases and an exhaustive check on small shapes. Saving and resharding them end to end:
tests/checkpoint/test_checkpoint.py and test_trainer.py."""
from __future__ import annotations

import itertools
import math

import torch

from k2mcore.optim.state_boxes import flat_range_boxes


def test_a_range_over_three_rows_is_a_partial_row_a_whole_row_and_a_partial_row():
    assert list(flat_range_boxes((3, 4), 2, 11)) == [
        ((0, 2), (1, 2), 2), ((1, 0), (1, 4), 4), ((2, 0), (1, 3), 8)]
    assert list(flat_range_boxes((3, 4), 4, 12)) == [((1, 0), (2, 4), 4)]
    assert list(flat_range_boxes((3, 4), 5, 7)) == [((1, 1), (1, 2), 5)]
    assert list(flat_range_boxes((3, 4), 5, 5)) == []


def test_every_range_of_small_tensors_is_covered_once_by_contiguous_boxes():
    for shape in [(5,), (2, 3), (3, 1, 4), (2, 3, 2, 2)]:
        n = math.prod(shape)
        ids = torch.arange(n).view(shape)
        for lo, hi in itertools.combinations(range(n + 1), 2):
            boxes = list(flat_range_boxes(shape, lo, hi))
            assert len(boxes) <= 2 * len(shape) - 1
            seen = []
            for offset, box, first in boxes:
                got = ids[tuple(slice(o, o + b) for o, b in zip(offset, box))].reshape(-1)
                assert got.tolist() == list(range(first, first + got.numel())), (shape, lo, hi)
                seen += got.tolist()
            assert seen == list(range(lo, hi)), (shape, lo, hi)
