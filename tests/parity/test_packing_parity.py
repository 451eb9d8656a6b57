"""Packed batches train as the unpacked ones: the same conversations, one per padded row or
packed several to a row (layout_worker.PACK_ROWS; with CP each padded to a multiple of 2·cp,
CP_PACK_ROWS), give the same loss and gradients at 1 rank, TP2+SP, PP2, CP2, CP2 x EP2 and
CP2 x TP2+SP, each against its own unpacked run and against 1 rank's unpacked and packed runs
(fp32, full shape)."""
from __future__ import annotations

import pytest

from layout_worker import CP_PACK_ROWS, PACK_LENGTHS, PACK_ROWS, PACKED_LAYOUTS, SEQ
from test_layout_parity import GRAD_RTOL, LOSS_RTOL, _worst_grad


@pytest.mark.parametrize("tag", ["packed", "packed-mbs2"])
@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_packed_loss_and_gradients_equal_unpacked(results, layout, tag):
    runs, one = results[layout]["packing"], results["1rank"]["packing"]
    for ref_name, (ref_loss, ref_grads) in (("own unpacked", runs["unpacked"]),
                                            ("1-rank unpacked", one["unpacked"]),
                                            ("1-rank packed", one["packed"])):
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


def test_the_cp_packed_rows_hold_every_conversation_padded():
    """CP2's rows: every conversation once, each padded to a multiple of 4, filling rows of SEQ
    at most, several rows holding more than one conversation."""
    assert sorted(i for row in CP_PACK_ROWS for i in row) == list(range(len(PACK_LENGTHS)))
    fill = [sum(-(-PACK_LENGTHS[i] // 4) * 4 for i in row) for row in CP_PACK_ROWS]
    assert max(fill) == SEQ and sum(len(row) >= 2 for row in CP_PACK_ROWS) >= 3
    assert len(CP_PACK_ROWS) % 2 == 0
