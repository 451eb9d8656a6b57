"""The trainer's packed micro-batch: rows end to end as one THD sequence, padded for SP."""
from __future__ import annotations

import pytest
import torch

from k2mcore.training.step import pack_micro_batch, packed_length


def _batch():
    # two rows of 5: documents of 3 and 2, then of 4 and a 1-token padding segment
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    return {"tokens": torch.arange(10).reshape(2, 5), "labels": torch.arange(1, 11).reshape(2, 5),
            "loss_mask": torch.tensor([[1.0, 1, 0, 1, 1], [0, 1, 1, 1, 0]]), "position_ids": pos}


def test_rows_end_to_end_with_their_documents():
    out = pack_micro_batch(_batch())
    assert out["tokens"].tolist() == [list(range(10))]
    params = out["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 9, 10]
    assert params.max_seqlen_q == params.max_seqlen_kv == 4  # the longest document, not 10


def test_padded_to_a_multiple_of_tp_with_a_masked_segment():
    out = pack_micro_batch(_batch(), multiple=4)
    assert packed_length(5, 2, 4) == 12 and out["tokens"].shape == (1, 12)
    assert out["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 5, 9, 10, 12]
    assert out["loss_mask"][0, 10:].tolist() == [0, 0]
    assert out["loss_mask"].sum() == _batch()["loss_mask"].sum()


def test_rows_that_do_not_start_a_document_are_refused():
    batch = _batch()
    batch["position_ids"] = batch["position_ids"] + 1
    with pytest.raises(ValueError, match="position_ids: a packed batch starts every document"):
        pack_micro_batch(batch)
