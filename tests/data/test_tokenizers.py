"""Both tokenizer kinds: text -> ids -> text round trips, equal ids, K2's special-token layout."""
from __future__ import annotations

import base64
import json

import pytest

from harness.data_helpers import TIKTOKEN, TOKENIZER_DIR, TOKENIZER_JSON, corpus_texts
from k2mcore.data.tokenizers import K2_SPECIAL_TOKENS, load_tokenizer
from k2mcore.errors import DataError

EXTRA = [
    "Kimi-K2 splits Han runs: 月之暗面的模型，很好。 And English contractions: we'll, it's.",
    "emoji 🚀🎉, accents café naïve, tabs\tand\r\nCRLF, 12345678 digits, ∑ maths",
    "special names stay text: <|im_end|> [EOS] [BOS] <|reserved_token_800|>",
    "",
]


@pytest.mark.parametrize("which", ["json", "tiktoken"])
def test_round_trip_real_text(trained_tokenizers, which):
    path = trained_tokenizers[0] if which == "json" else trained_tokenizers[1]
    tok = load_tokenizer(path)
    assert tok.kind == ("hf" if which == "json" else "tiktoken")
    texts = corpus_texts(300, start=1000) + EXTRA  # docs the tokenizer was not trained on
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # it is a real BPE: real text compresses well below a byte per token
    sample = "".join(texts[:50])
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode())


def test_both_kinds_give_the_same_ids(trained_tokenizers):
    hf, tk = (load_tokenizer(p) for p in trained_tokenizers)
    for text in corpus_texts(200, start=500) + EXTRA:
        assert hf.encode(text) == tk.encode(text)
    assert hf.vocab_size == tk.vocab_size == 1024
    assert hf.special_tokens == tk.special_tokens
    assert hf.fingerprint() == tk.fingerprint()


def test_special_names_are_plain_text(trained_tokenizers):
    for path in trained_tokenizers:
        tok = load_tokenizer(path)
        ids = tok.encode("<|im_end|>[EOS]")
        assert tok.special_tokens["<|im_end|>"] not in ids and tok.eod not in ids


def test_bundled_tokenizer_is_k2_layout():
    tk, hf = load_tokenizer(TIKTOKEN), load_tokenizer(TOKENIZER_JSON)
    assert tk.vocab_size == hf.vocab_size == 1024  # = k2-tiny model.vocab_size
    base = 1024 - 256
    for offset, name in K2_SPECIAL_TOKENS.items():
        assert tk.special_tokens[name] == base + offset
        assert tk.decode([base + offset]) == name
    assert tk.special_tokens["<|reserved_token_773|>"] == 773
    assert tk.eod == tk.special_tokens["[EOS]"] == base + 1 == hf.eod
    assert tk.fingerprint() == hf.fingerprint()


def test_tokenizer_config_names_specials(tmp_path):
    """K2's HF layout: tokenizer_config.json beside tiktoken.model names the reserved ids."""
    model = tmp_path / "tiktoken.model"
    model.write_bytes(TIKTOKEN.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"768": {"content": "<|endoftext|>"}, "770": {"content": "<x>"}}
    }))
    tok = load_tokenizer(model)
    assert tok.special_tokens["<|endoftext|>"] == 768 and tok.special_tokens["<x>"] == 770
    assert tok.eod == 768 and "[EOS]" not in tok.special_tokens
    assert tok.special_tokens["<|reserved_token_769|>"] == 769


def test_bad_tokenizer_files(tmp_path):
    junk = tmp_path / "junk.tiktoken"
    junk.write_text(base64.b64encode(b"a").decode() + " 0\nthis is not a rank line\n")
    with pytest.raises(DataError, match=r"junk\.tiktoken:2: not a tiktoken BPE line"):
        load_tokenizer(junk)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{\"model\": 3}")
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(bad_json)
    with pytest.raises(DataError, match=r"data\.tokenizer: tokenizer file .*nope.* not found"):
        load_tokenizer(tmp_path / "nope.tiktoken")


def test_tokenizer_directory_is_its_tokenizer_json(tmp_path):
    """data.tokenizer may name a Hugging Face directory: the same ids and fingerprint as the
    file, so data made with either is accepted with the other."""
    d, f = load_tokenizer(TOKENIZER_DIR), load_tokenizer(TOKENIZER_JSON)
    assert d.kind == "hf" and d.path == TOKENIZER_DIR / "tokenizer.json"
    assert d.name == "k2-tiny/tokenizer.json" and f.name == "k2-tiny.tokenizer.json"
    for text in corpus_texts(100, start=700) + EXTRA:
        assert d.encode(text) == f.encode(text)
    assert d.fingerprint() == f.fingerprint() == load_tokenizer(TIKTOKEN).fingerprint()
    assert (d.vocab_size, d.eod, d.special_tokens) == (f.vocab_size, f.eod, f.special_tokens)
    assert d.pad == f.pad == 1024 - 256 + 255  # [PAD]: the config's pad_token, K2's slot
    # K2's own layout: a directory with tiktoken.model
    (tmp_path / "tiktoken.model").write_bytes(TIKTOKEN.read_bytes())
    t = load_tokenizer(tmp_path)
    assert t.kind == "tiktoken" and t.fingerprint() == f.fingerprint()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"data\.tokenizer: tokenizer directory .*empty has no "
                                        r"tokenizer\.json \(nor tiktoken\.model\)"):
        load_tokenizer(empty)


def test_directory_config_names_pad_and_eod(tmp_path, trained_tokenizers):
    """Without an EOD candidate in the vocabulary, the config's eos_token is the EOD; its
    pad_token is the padding id."""
    data = json.loads(trained_tokenizers[0].read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[EOS]"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": {"content": "[UNK]"}}))
    tok = load_tokenizer(tmp_path)
    assert tok.eod == tok.special_tokens["<|im_end|>"] and tok.pad == tok.special_tokens["[UNK]"]
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path)
