"""compat.uneven_shards: registered buckets are cut at their planned bounds, others as megatron
cuts them; bad bounds are refused in one line; a dead bucket leaves no registration behind."""
from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from k2mcore.compat import uneven_shards


def test_registered_buckets_are_cut_at_their_bounds_and_others_equally():
    from megatron.core.distributed import param_and_grad_buffer as pgb

    uneven_shards.install()
    grad = torch.arange(10.0)
    bucket = SimpleNamespace(grad_data=grad, param_data=None)
    uneven_shards.register(bucket, [(0, 7), (7, 10)])
    assert [v.tolist() for v in pgb.shard_buffer(grad, 2)] == [list(range(7)), [7.0, 8.0, 9.0]]
    other = torch.arange(10.0)
    assert [v.numel() for v in pgb.shard_buffer(other, 2)] == [5, 5]  # megatron's own cut
    key = id(grad)
    del bucket, grad
    gc.collect()
    assert key not in uneven_shards._BOUNDS


@pytest.mark.parametrize("bounds", [[(0, 6), (7, 10)], [(0, 7), (7, 9)], [(1, 7), (7, 10)]])
def test_bounds_that_do_not_cover_the_bucket_are_refused(bounds):
    bucket = SimpleNamespace(grad_data=torch.zeros(10), param_data=None)
    with pytest.raises(ValueError, match=r"^uneven shards .* do not cover the bucket's 10 "
                                         r"elements$"):
        uneven_shards.register(bucket, bounds)
