"""ChatDataset: shift, mask and padding by hand; megatron's split ranges; deterministic epochs;
the pair's checks; the shipped sample."""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from harness.data_helpers import CHAT_PREFIX, TOKENIZER_DIR, write_dataset
from k2mcore.data import ChatDataset, build_chat_datasets, check_chat_dataset
from k2mcore.data.batches import FIELDS, fetch_sample
from k2mcore.data.chat.dataset import chat_prefixes, shuffled_documents, split_ranges
from k2mcore.data.tokenizers import load_tokenizer
from k2mcore.errors import DataError

PAD = 1023

# (ids, mask) per conversation
PAIRS = [([10, 11, 12, 13, 14], [0, 0, 1, 1, 1]),
         ([20, 21, 22], [0, 1, 1]),
         ([30, 31, 32, 33, 34, 35, 36, 37], [0, 0, 0, 1, 1, 0, 1, 1])]


def _write_pair(prefix: str, pairs, mask_dtype=np.uint8) -> str:
    ids_prefix, mask_prefix = chat_prefixes(prefix)
    write_dataset(ids_prefix, [i for i, _ in pairs])
    write_dataset(mask_prefix, [m for _, m in pairs], dtype=mask_dtype)
    return prefix


@pytest.fixture
def small(tmp_path):
    return _write_pair(str(tmp_path / "d" / "chat"), PAIRS)


def test_shift_mask_and_padding_by_hand(small):
    ds = ChatDataset(small, 6, pad_id=PAD, shuffle=False)
    assert len(ds) == 3
    s = ds[0]
    assert set(s) == set(FIELDS)
    assert s["tokens"].tolist() == [10, 11, 12, 13, PAD, PAD]
    assert s["labels"].tolist() == [11, 12, 13, 14, PAD, PAD]
    assert s["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0]
    assert s["position_ids"].tolist() == [0, 1, 2, 3, 4, 5]
    assert (s["tokens"].dtype, s["labels"].dtype, s["loss_mask"].dtype) == \
        (np.int64, np.int64, np.float32)
    assert ds[1]["loss_mask"].tolist() == [1, 1, 0, 0, 0, 0]
    long = ds[2]  # 8 tokens > seq_length + 1: truncated to 7
    assert long["tokens"].tolist() == [30, 31, 32, 33, 34, 35]
    assert long["labels"].tolist() == [31, 32, 33, 34, 35, 36]
    assert long["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1]
    # what the loaders read: fetch_sample's FIELDS tuple
    assert [a.tolist() for a in fetch_sample(ds, 0)] == [s[k].tolist() for k in FIELDS]
    with pytest.raises(IndexError):
        ds[3]


@pytest.mark.parametrize("split", ["98,2,0", "1,1,1", "90,5,5", "70,30", "100,0,0", "5,0,3",
                                   "0.3,0.3,0.4"])
@pytest.mark.parametrize("n", [1, 7, 10, 478, 1001])
def test_split_ranges_are_megatrons(split, n):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    # megatron's _build_megatron_dataset_splits: round(bookend * number of documents)
    expected = [None if b is None else (int(round(b[0] * n)), int(round(b[1] * n)))
                for b in matrix]
    assert split_ranges(split, n) == expected


def test_shuffle_is_deterministic_per_epoch():
    a = shuffled_documents((100, 110), 35, seed=7)
    assert a.tolist() == shuffled_documents((100, 110), 35, seed=7).tolist()
    assert a.tolist() != shuffled_documents((100, 110), 35, seed=8).tolist()
    assert a.tolist() != shuffled_documents((100, 110), 35, seed=7, split_index=1).tolist()
    for epoch in range(3):  # each epoch a new permutation of the split's documents
        assert sorted(a[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(100, 110))
    assert a[:10].tolist() != a[10:20].tolist()
    # asking for more samples later draws the same ones first
    assert shuffled_documents((100, 110), 12, seed=7).tolist() == a[:12].tolist()
    assert len(shuffled_documents((100, 110), None, seed=7)) == 10


def test_build_chat_datasets(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(50):  # conversation k starts with token k: a sample says where it came from
        n = int(rng.integers(3, 20))
        pairs.append(([k] + rng.integers(100, 900, n).tolist(), rng.integers(0, 2, n + 1).tolist()))
    prefix = _write_pair(str(tmp_path / "chat"), pairs)
    out = build_chat_datasets(prefix, 16, "80,10,10", 1234, [100, None, 3], PAD)
    assert [len(out[s]) for s in ("train", "valid", "test")] == [100, 5, 3]
    firsts = {s: {int(out[s][i]["tokens"][0]) for i in range(len(out[s]))} for s in out}
    assert firsts["train"] == set(range(40))  # contiguous ranges, as megatron splits
    assert firsts["valid"] == set(range(40, 45)) and firsts["test"] <= set(range(45, 50))
    again = build_chat_datasets(prefix, 16, "80,10,10", 1234, [100, None, 3], PAD)
    for i in (0, 57, 99):
        for k in FIELDS:
            assert np.array_equal(out["train"][i][k], again["train"][i][k])
    other = build_chat_datasets(prefix, 16, "80,10,10", 1235, [100, None, 3], PAD)
    assert [int(other["train"][i]["tokens"][0]) for i in range(40)] != \
        [int(out["train"][i]["tokens"][0]) for i in range(40)]
    assert build_chat_datasets(prefix, 16, "100,0,0", 1, [10, 0, 0], PAD)["valid"] is None
    # the ids prefix is accepted as the dataset's name too
    assert len(build_chat_datasets(prefix + "_input_ids_document", 16, "1", 1, [5], PAD)["train"]) \
        == 5
    with pytest.raises(DataError, match=r"data\.split: .99,1,0. leaves the valid split of .*chat "
                                        r"\(50 conversations\) empty"):
        build_chat_datasets(prefix, 16, "99,1,0", 1, [10, 1, 0], PAD)


def test_shipped_sample_checks_and_reads():
    tok = load_tokenizer(TOKENIZER_DIR)
    info = check_chat_dataset(str(CHAT_PREFIX), vocab_size=1024, split="98,2,0",
                              tokenizer_fingerprint=tok.fingerprint(),
                              tokenizer_path=str(TOKENIZER_DIR))
    assert info.num_documents == 478 and 0 < info.num_loss_tokens < info.num_tokens
    ds = build_chat_datasets(str(CHAT_PREFIX), 256, "98,2,0", 1234, [16, 8, 0], tok.pad)
    s = ds["train"][0]
    assert s["tokens"][0] == tok.special_tokens["<|im_system|>"]
    assert s["loss_mask"].sum() > 0 and ds["test"] is None


# --- checks: one line naming the file ---------------------------------------------------------
def _fails(prefix, pattern, **kw):
    with pytest.raises(DataError) as err:
        check_chat_dataset(prefix, vocab_size=1024, **kw)
    msg = str(err.value)
    assert "\n" not in msg and re.search(pattern, msg), msg


def test_check_accepts_good_data(small):
    info = check_chat_dataset(small, vocab_size=1024)
    assert (info.num_documents, info.num_tokens, info.num_loss_tokens) == (3, 16, 9)


@pytest.mark.parametrize("which, ext", [("input_ids", ".bin"), ("loss_mask", ".idx")])
def test_check_missing_file(small, which, ext):
    path = f"{small}_{which}_document{ext}"
    os.remove(path)
    _fails(small, rf"data\.blend: {re.escape(path)} not found")


def test_check_mismatched_lengths(tmp_path):
    prefix = str(tmp_path / "c")
    ids_prefix, mask_prefix = chat_prefixes(prefix)
    write_dataset(ids_prefix, [i for i, _ in PAIRS])
    write_dataset(mask_prefix, [PAIRS[0][1], PAIRS[1][1] + [0], PAIRS[2][1]], dtype=np.uint8)
    _fails(prefix, r"c_loss_mask_document\.idx: conversation 1 has 4 mask values but "
                   r".*c_input_ids_document\.idx has 3 tokens")
    write_dataset(mask_prefix, [m for _, m in PAIRS[:2]], dtype=np.uint8)
    _fails(prefix, r"c_loss_mask_document\.idx has 2 conversations but .*c_input_ids_document"
                   r"\.idx has 3")


def test_check_ids_past_the_vocab_and_bad_masks(tmp_path):
    big = _write_pair(str(tmp_path / "big"), PAIRS[:2] + [([5, 1500, 7], [0, 1, 1])])
    _fails(big, r"big_input_ids_document\.bin: token id 1500 >= model\.vocab_size=1024")
    two = _write_pair(str(tmp_path / "two"), PAIRS[:2] + [([5, 6, 7], [0, 2, 1])])
    _fails(two, r"two_loss_mask_document\.bin: loss mask value 2 \(expected 0 or 1\)")
    wide = _write_pair(str(tmp_path / "wide"), PAIRS, mask_dtype=np.uint16)
    _fails(wide, r"wide_loss_mask_document\.idx holds uint16, not a uint8 loss mask")


def test_check_split(small):
    _fails(small, r"data\.split: '98,2,0' leaves the valid split of .*chat \(3 conversations\) "
                  r"empty", split="98,2,0")
    check_chat_dataset(small, vocab_size=1024, split="1,1,1")


def test_check_data_made_with_another_tokenizer(tmp_path, trained_tokenizers):
    for src in chat_prefixes(str(CHAT_PREFIX)):
        for ext in (".bin", ".idx", ".json"):
            shutil.copyfile(src + ext, str(tmp_path / os.path.basename(src)) + ext)
    other = load_tokenizer(trained_tokenizers[0])
    _fails(str(tmp_path / "stdlib_chat"),
           r"stdlib_chat_input_ids_document\.bin was tokenized with k2-tiny/tokenizer\.json .* "
           r"but data\.tokenizer=.*trained\.tokenizer\.json has fingerprint .*tokenizer/vocab "
           r"mismatch", tokenizer_fingerprint=other.fingerprint(),
           tokenizer_path=str(trained_tokenizers[0]))
