"""Each bad input is one line naming the file or field, raised before any index is built."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from harness.data_helpers import (
    SAMPLE_PREFIX,
    TOKENIZER_JSON,
    make_cfg,
    random_docs,
    write_dataset,
)
from k2mcore.config.loader import load_config
from k2mcore.data import build_data_iterator, check_data
from k2mcore.data.preprocess import preprocess
from k2mcore.errors import ConfigError, DataError
from k2mcore.parallel.layout import resolve_layout


@pytest.fixture
def good(tmp_path):
    return write_dataset(str(tmp_path / "data" / "good"), random_docs(0, 50, 0, 1000))


def _fails(cfg, pattern: str) -> str:
    """Both entry points refuse with the same one-line message; no index cache was written."""
    with pytest.raises(DataError) as first:
        check_data(cfg)
    with pytest.raises(DataError) as second:
        build_data_iterator(cfg, dp_rank=0, dp_size=1, consumed_samples=0)
    msg = str(first.value)
    assert msg == str(second.value) and "\n" not in msg
    assert re.search(pattern, msg), msg
    assert not os.path.isdir(cfg.data.cache_dir) or not any(
        f.endswith(".npy") for f in os.listdir(cfg.data.cache_dir))
    return msg


def test_good_data_passes(tmp_path, good):
    summary = check_data(make_cfg(tmp_path, good))
    assert summary.infos[0].num_documents == 50


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_missing_file(tmp_path, good, ext):
    os.remove(good + ext)
    _fails(make_cfg(tmp_path, good), rf"data\.blend: {good}\{ext} not found")


def test_missing_dataset_in_blend(tmp_path, good):
    _fails(make_cfg(tmp_path, f"0.5 {good} 0.5 {tmp_path}/nope"),
           rf"data\.blend: {tmp_path}/nope\.idx not found")


def test_truncated_bin(tmp_path, good):
    with open(good + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(good + ".bin") - 10)
    _fails(make_cfg(tmp_path, good), rf"{good}\.bin has \d+ bytes but {good}\.idx describes")


def test_truncated_idx(tmp_path, good):
    with open(good + ".idx", "r+b") as f:
        f.truncate(100)
    _fails(make_cfg(tmp_path, good), rf"{good}\.idx is corrupt")


def test_garbage_idx(tmp_path, good):
    with open(good + ".idx", "wb") as f:
        f.write(b"not an index at all" * 10)
    _fails(make_cfg(tmp_path, good), rf"{good}\.idx is not a megatron \.idx file")


def test_token_ids_past_the_vocab(tmp_path):
    prefix = write_dataset(str(tmp_path / "big"), random_docs(1, 20, 0, 1000) + [[5, 1500, 7]])
    _fails(make_cfg(tmp_path, prefix),
           rf"{prefix}\.bin: token id 1500 >= model\.vocab_size=1024")


def test_empty_documents(tmp_path):
    docs = random_docs(2, 10, 0, 1000)
    prefix = write_dataset(str(tmp_path / "holes"), docs[:4] + [[]] + docs[4:] + [[]])
    _fails(make_cfg(tmp_path, prefix), rf"{prefix}\.idx: document 4 is empty .*2 empty in all")


def test_tokenizer_larger_than_model_vocab(tmp_path, good):
    _fails(make_cfg(tmp_path, good, "model.vocab_size=512"),
           r"data\.tokenizer: .*k2-tiny\.tiktoken has 1024 token ids but model\.vocab_size=512")


def test_data_made_with_another_tokenizer(tmp_path, trained_tokenizers):
    """The shipped data (made with k2-tiny.tiktoken) with a different tokenizer configured."""
    for ext in (".bin", ".idx", ".json"):
        shutil.copyfile(str(SAMPLE_PREFIX) + ext, str(tmp_path / "s") + ext)
    cfg = make_cfg(tmp_path, str(tmp_path / "s"), tokenizer=str(trained_tokenizers[1]))
    _fails(cfg, rf"{tmp_path}/s\.bin was tokenized with k2-tiny\.tiktoken .* but "
                rf"data\.tokenizer=.*trained\.tiktoken has fingerprint .*tokenizer/vocab mismatch")
    # the equivalent tokenizer.json of the same tokenizer is accepted
    check_data(make_cfg(tmp_path, str(tmp_path / "s"), tokenizer=str(TOKENIZER_JSON)))


def test_missing_tokenizer_file(tmp_path, good):
    _fails(make_cfg(tmp_path, good, tokenizer=str(tmp_path / "tok.tiktoken")),
           rf"data\.tokenizer: tokenizer file {tmp_path}/tok\.tiktoken not found")


@pytest.mark.parametrize("blend, pattern", [
    ("0.3 {p} x0.7 {p}", r"data\.blend: weight 'x0\.7' \(item 3\) is not a number"),
    ("0.3 {p} 0.7", r"data\.blend: 3 items; a weighted blend needs 'weight prefix' pairs"),
    ("0.3 {p} -1 {p}", r"data\.blend: weight '-1' \(item 3\) must be > 0"),
    ("{p} 0.5 {p}", r"data\.blend: item 2 '0\.5' looks like a weight"),
    ("0.5 0.5 {p} {p}", r"data\.blend: item 2 '0\.5' is a number where a dataset prefix belongs"),
])
def test_blend_that_does_not_parse(tmp_path, good, blend, pattern):
    cfg = make_cfg(tmp_path, blend.format(p=good))
    with pytest.raises(ConfigError, match=pattern):  # k2m-train --check catches it too
        resolve_layout(cfg, 1)
    _fails(cfg, pattern)


def test_split_leaving_a_dataset_without_valid_documents(tmp_path):
    prefix = write_dataset(str(tmp_path / "small"), random_docs(3, 10, 0, 1000))
    _fails(make_cfg(tmp_path, prefix), r"data\.split: '98,2,0' leaves the valid split of "
                                       rf"{prefix} \(10 documents\) empty")
    check_data(make_cfg(tmp_path, prefix, "data.split=100,0,0"))


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: required when data\.blend is set"):
        resolve_layout(load_config("k2-tiny", ["data.tokenizer=null"]), 1)
    with pytest.raises(ConfigError, match=r"data\.split: '0,1,0' gives the train split no data"):
        resolve_layout(load_config("k2-tiny", ["data.split=0,1,0"]), 1)
    with pytest.raises(ConfigError, match=r"data\.split: 'a' in 'a,b' is not a non-negative"):
        resolve_layout(load_config("k2-tiny", ["data.split=a,b"]), 1)
    with pytest.raises(ConfigError, match=r"data\.prefetch: must be >= 1, got 0"):
        resolve_layout(load_config("k2-tiny", ["data.prefetch=0"]), 1)
    resolve_layout(load_config("k2-tiny"), 1)  # the preset itself is fine


def test_resume_past_the_built_samples(tmp_path, good):
    cfg = make_cfg(tmp_path, good, "data.split=100,0,0", "train.iters=2")
    n = len(build_data_iterator(cfg, dp_rank=0, dp_size=1, consumed_samples=0))
    with pytest.raises(DataError, match=rf"consumed_samples={n + 8} exceeds the {n} samples"):
        build_data_iterator(cfg, dp_rank=0, dp_size=1, consumed_samples=n + 8)


def test_preprocess_without_eod_token(tmp_path, trained_tokenizers):
    """--append-eod with a tokenizer that has no EOD: one line naming the flag and file."""
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    tok = tmp_path / "noeod.tokenizer.json"
    data = json.loads(open(trained_tokenizers[0]).read())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[EOS]"]
    tok.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"--append-eod: .*noeod\.tokenizer\.json has no end-of"):
        preprocess([str(src)], str(tmp_path / "o"), str(tok), append_eod=True, progress=False)
    assert np.all([not p.name.startswith("o_") for p in tmp_path.iterdir()])
