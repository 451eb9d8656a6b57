"""Packed batches train as the unpacked ones: the same conversations, one per padded row or
packed several to a row (layout_worker.PACK_ROWS), give the same loss and gradients at 1 rank,
TP2+SP and PP2, each against its own unpacked run and against 1 rank's (fp32, full shape)."""
from __future__ import annotations

import pytest

from layout_worker import PACK_LENGTHS, PACK_ROWS, PACKED_LAYOUTS, SEQ
from test_layout_parity import GRAD_RTOL, LOSS_RTOL, _worst_grad


@pytest.mark.parametrize("tag", ["packed", "packed-mbs2"])
@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_packed_loss_and_gradients_equal_unpacked(results, layout, tag):
    runs = results[layout]["packing"]
    for ref_name, (ref_loss, ref_grads) in (("own unpacked", runs["unpacked"]),
                                            ("1-rank unpacked",
                                             results["1rank"]["packing"]["unpacked"])):
        loss, grads = runs[tag]
        assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (ref_name, loss, ref_loss)
        worst, key = _worst_grad(ref_grads, grads)
        print(f"{layout} {tag} vs {ref_name}: loss diff {abs(loss - ref_loss):.1e}, "
              f"worst grad diff {worst:.1e} of max |grad| at {key}")
        assert worst <= GRAD_RTOL, f"{ref_name}: {key}: {worst:.2e}"


def test_the_packed_batch_is_really_packed():
    """Guards the comparison: rows hold several conversations, most end in padding, and the
    unpacked run has as many rows as conversations."""
    fill = [sum(PACK_LENGTHS[i] for i in row) for row in PACK_ROWS]
    assert sorted(i for row in PACK_ROWS for i in row) == list(range(len(PACK_LENGTHS)))
    assert max(fill) == SEQ and sum(f < SEQ for f in fill) >= 2
    assert all(len(row) >= 2 for row in PACK_ROWS) and len(PACK_ROWS) % 2 == 0
