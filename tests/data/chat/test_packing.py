"""Packing: first fit over a window of open rows, PackedChatDataset rows (each conversation as
its unpacked sample without the padding, positions restarting), the truncation rule, the
loaders' packed batches, and the packing efficiency of the bundled sample."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from harness.data_helpers import CHAT_PREFIX, TOKENIZER_DIR, write_dataset
from k2mcore.data.batches import FIELDS
from k2mcore.data.chat.dataset import (
    ChatDataset,
    PackedChatDataset,
    build_chat_datasets,
    chat_prefixes,
)
from k2mcore.data.chat.packing import first_fit, packing_efficiency, positions
from k2mcore.errors import DataError

PAD = 1023


def _write_pair(prefix: str, pairs) -> str:
    ids_prefix, mask_prefix = chat_prefixes(prefix)
    write_dataset(ids_prefix, [i for i, _ in pairs])
    write_dataset(mask_prefix, [m for _, m in pairs], dtype=np.uint8)
    return prefix


@pytest.fixture
def convs(tmp_path):
    """40 conversations of 2..30 tokens; conversation k starts with token k."""
    rng = np.random.default_rng(3)
    pairs = []
    for k in range(40):
        n = int(rng.integers(1, 30))
        pairs.append(([k] + rng.integers(100, 900, n).tolist(), rng.integers(0, 2, n + 1).tolist()))
    return _write_pair(str(tmp_path / "chat"), pairs)


def test_first_fit_by_hand():
    # 5 and 4 share a row; 7 opens a second, 3 fills the first (5+4+3 = 12 = seq_length)
    # and it leaves at once; 9 fits no open row (7 + 9 > 12) but the window has room
    assert first_fit([5, 4, 7, 3, 9, 2], 12) == [[0, 1, 3], [2, 5], [4]]
    # window 1 is next fit: a row closes as soon as an item does not fit
    assert first_fit([5, 4, 7, 3, 9, 2], 12, window=1) == [[0, 1], [2, 3], [4, 5]]
    assert first_fit([0, 3, 0], 4) == [[1]]  # nothing to predict: skipped
    with pytest.raises(ValueError, match="item 1: 13 positions exceed seq_length=12"):
        first_fit([1, 13], 12)


def test_first_fit_rows_do_not_depend_on_how_many_are_asked():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 2000).tolist()
    full = first_fit(lengths, 64)
    assert sorted(i for r in full for i in r) == list(range(2000))  # each item once
    assert all(sum(lengths[i] for i in r) <= 64 and r == sorted(r) for r in full)
    endless = itertools.cycle(lengths)
    assert first_fit(endless, 64, rows=100) == full[:100]
    assert first_fit(lengths, 64, rows=10) == full[:10]


def test_packed_rows_are_the_unpacked_samples_end_to_end(convs):
    unpacked = ChatDataset(convs, 16, pad_id=PAD, shuffle=False)
    packed = PackedChatDataset(convs, 16, pad_id=PAD, shuffle=False)
    seen = []
    for i in range(len(packed)):
        row, docs, lengths = packed[i], packed.row_documents(i), packed.row_lengths(i)
        assert set(row) == set(FIELDS) and sum(lengths) == 16 and len(docs) >= 1
        at = 0
        for doc, n in zip(docs, lengths):
            alone = unpacked[doc]
            for k in ("tokens", "labels", "loss_mask"):
                assert row[k][at:at + n].tolist() == alone[k][:n].tolist(), (i, doc, k)
            assert row["position_ids"][at:at + n].tolist() == list(range(n))
            at += n
        pad = 16 - at  # the padding: its own segment, no loss
        assert row["position_ids"][at:].tolist() == list(range(pad))
        assert row["loss_mask"][at:].sum() == 0 and (row["tokens"][at:] == PAD).all()
        seen += docs
    assert sorted(seen) == list(range(40))  # one epoch: every conversation once
    assert len(packed) < 40
    total = sum(unpacked[d]["loss_mask"].sum() for d in range(40))
    assert sum(packed[i]["loss_mask"].sum() for i in range(len(packed))) == total


@pytest.mark.parametrize("multiple", [4, 8])
def test_packed_rows_for_context_parallelism_pad_every_conversation(convs, multiple):
    """pad_multiple (2·cp): each conversation is its unpacked sample, then masked padding up to
    a multiple of 2·cp with its positions going on, so the trainer's documents split into 2·cp
    equal chunks; every conversation once, the same loss tokens."""
    unpacked = ChatDataset(convs, 16, pad_id=PAD, shuffle=False)
    packed = PackedChatDataset(convs, 16, pad_id=PAD, shuffle=False, pad_multiple=multiple)
    seen = []
    for i in range(len(packed)):
        row, docs, lengths = packed[i], packed.row_documents(i), packed.row_lengths(i)
        assert sum(lengths) == 16 and all(n % multiple == 0 for n in lengths)
        at = 0
        for doc, n in zip(docs, lengths):
            real = positions(int(unpacked._ids.sequence_lengths[doc]), 16)
            assert n == -(-real // multiple) * multiple
            for k in ("tokens", "labels", "loss_mask"):
                assert row[k][at:at + real].tolist() == unpacked[doc][k][:real].tolist()
            assert row["position_ids"][at:at + n].tolist() == list(range(n))  # one document
            assert row["loss_mask"][at + real:at + n].sum() == 0
            assert (row["tokens"][at + real:at + n] == PAD).all()
            at += n
        seen += docs
    assert sorted(seen) == list(range(40))
    total = sum(unpacked[d]["loss_mask"].sum() for d in range(40))
    assert sum(packed[i]["loss_mask"].sum() for i in range(len(packed))) == total
    with pytest.raises(DataError, match="pad_multiple=3 does not divide train.seq_length=16"):
        PackedChatDataset(convs, 16, pad_id=PAD, pad_multiple=3)


def test_packed_rows_follow_the_shuffle_and_are_stable(convs):
    a = PackedChatDataset(convs, 16, pad_id=PAD, num_samples=50, seed=5)
    b = PackedChatDataset(convs, 16, pad_id=PAD, num_samples=80, seed=5)
    assert len(a) == 50 and len(b) == 80
    assert [a.row_documents(i) for i in range(50)] == [b.row_documents(i) for i in range(50)]
    for i in (0, 17, 49):
        for k in FIELDS:
            assert np.array_equal(a[i][k], b[i][k])
    c = PackedChatDataset(convs, 16, pad_id=PAD, num_samples=50, seed=6)
    assert [a.row_documents(i) for i in range(50)] != [c.row_documents(i) for i in range(50)]
    out = build_chat_datasets(convs, 16, "80,10,10", 5, [30, 4, None], PAD, packing=True)
    assert isinstance(out["train"], PackedChatDataset) and len(out["train"]) == 30
    assert {d for i in range(30) for d in out["train"].row_documents(i)} <= set(range(32))
    assert {d for i in range(4) for d in out["valid"].row_documents(i)} <= set(range(32, 36))


def test_overlong_conversations_are_cut_or_refused_in_one_line(convs):
    from k2mcore.data.indexed import read_index

    lengths = read_index(chat_prefixes(convs)[0]).sequence_lengths
    first = int(np.flatnonzero(lengths > 9)[0])
    packed = PackedChatDataset(convs, 8, pad_id=PAD, shuffle=False)  # data.truncate: true
    rows = [i for i in range(len(packed)) if first in packed.row_documents(i)]
    assert packed.row_lengths(rows[0]) == [8]  # cut to 9 tokens: a full row alone
    for cls in (ChatDataset, PackedChatDataset):
        with pytest.raises(DataError) as err:
            cls(convs, 8, pad_id=PAD, shuffle=False, truncate=False)
        msg = str(err.value)
        assert "\n" not in msg and re.match(
            rf"data\.truncate: false, but conversation {first} of .*chat has "
            rf"{int(lengths[first])} tokens, more than train\.seq_length\+1=9 \(\d+ such in the "
            rf"train split", msg), msg
    ChatDataset(convs, 40, pad_id=PAD, truncate=False)  # none longer: accepted
    # packed for CP2 (padded to 4): the message says what the padding made of it
    with pytest.raises(DataError) as err:
        PackedChatDataset(convs, 8, pad_id=PAD, shuffle=False, truncate=False, pad_multiple=4)
    msg = str(err.value)
    assert "\n" not in msg and re.match(
        rf"data\.truncate: false, but conversation {first} of .*chat has "
        rf"{int(lengths[first])} tokens, \d+ positions padded to a multiple of "
        rf"2\*parallel\.cp=4, more than train\.seq_length\+1=9 \(", msg), msg


def test_efficiency_counts_real_positions(convs):
    eff = packing_efficiency([5, 13, 1, 40, 9], 12)  # positions 4, 12, 0 (skipped), 12, 8
    assert (eff.conversations, eff.tokens, eff.longest) == (4, 36, 12)
    assert eff.rows == 3 and eff.packed == 36 / 36  # [4, 8], [12], [12]
    assert eff.padded_to_seq_length == 36 / 48 and eff.padded_to_longest == 36 / 48
    assert positions(40, 12) == 12 and positions(1, 12) == 0


def test_bundled_sample_packing_figures():
    """docs/data.md's figures: the bundled chat sample in file order."""
    from k2mcore.data.indexed import read_index

    lengths = read_index(str(CHAT_PREFIX) + "_input_ids_document").sequence_lengths
    got = {s: packing_efficiency(lengths, s) for s in (256, 1024)}
    print({s: e.describe() for s, e in got.items()})
    assert (got[256].rows, got[1024].rows) == (368, 132)
    assert round(got[256].packed, 3) == 0.945 and round(got[256].padded_to_longest, 3) == 0.727
    assert round(got[1024].packed, 3) == 0.961 and round(got[1024].padded_to_longest, 3) == 0.308


def test_packed_batches_through_the_loader():
    """data.packing: the torch loader's micro-batches are PackedChatDataset rows; the sampler
    counts rows, and position_ids mark the documents."""
    import torch

    from k2mcore.config.loader import load_config
    from k2mcore.data import build_data_iterator, load_tokenizer
    from k2mcore.model.packing import cu_seqlens_from_positions

    cfg = load_config("k2-tiny", [
        "data.format=chat", "data.blend=assets:sample/stdlib_chat",
        f"data.tokenizer={TOKENIZER_DIR}", "train.seq_length=256", "data.packing=true",
        "data.loader=torch", "data.num_workers=0", "train.micro_batch_size=2",
        "train.iters=2"])
    it = build_data_iterator(cfg, dp_rank=1, dp_size=2, consumed_samples=8)
    batch = next(it)  # rows 10 and 11 (the single long conversations come out first)
    assert it.consumed_samples == 12 and batch["tokens"].shape == (2, 256)
    cu = cu_seqlens_from_positions(batch["position_ids"])
    assert cu.tolist() == [0, 93, 181, 256, 441, 512]
    pad = load_tokenizer(TOKENIZER_DIR).pad
    ds = PackedChatDataset(str(CHAT_PREFIX), 256, pad_id=pad, num_samples=16, seed=1234,
                           documents=(0, 468))  # the train split of "98,2,0"
    for k in FIELDS:
        assert torch.equal(batch[k], torch.from_numpy(np.stack([ds[10][k], ds[11][k]]))), k


def test_check_data_refuses_overlong_conversations_before_training():
    """What k2m-train runs before any process group: with packing on and data.truncate off, a
    conversation longer than train.seq_length + 1 is one line naming it."""
    from k2mcore.config.loader import load_config
    from k2mcore.data import check_data

    sets = ["data.format=chat", "data.blend=assets:sample/stdlib_chat",
            f"data.tokenizer={TOKENIZER_DIR}", "data.packing=true"]
    check_data(load_config("k2-tiny", sets + ["train.seq_length=256"]))  # truncate: true
    with pytest.raises(DataError) as err:
        check_data(load_config("k2-tiny", sets + ["train.seq_length=256", "data.truncate=false"]))
    msg = str(err.value)
    assert "\n" not in msg and re.match(
        r"data\.truncate: false, but conversation (\d+) of .*stdlib_chat has (\d+) tokens, more "
        r"than train\.seq_length\+1=257 \(\d+ such in the dataset; set data\.truncate=true", msg)
    check_data(load_config("k2-tiny", sets + ["train.seq_length=1024", "data.truncate=false"]))
    # packing with context parallelism: the line says what the padding to 2·cp made of it
    with pytest.raises(DataError) as err:
        check_data(load_config("k2-tiny", sets + ["train.seq_length=256", "data.truncate=false",
                                                  "parallel.cp=2"]))
    msg = str(err.value)
    assert "\n" not in msg and re.match(
        r"data\.truncate: false, but conversation \d+ of .*stdlib_chat has \d+ tokens, \d+ "
        r"positions padded to a multiple of 2\*parallel\.cp=4, more than "
        r"train\.seq_length\+1=257", msg), msg
