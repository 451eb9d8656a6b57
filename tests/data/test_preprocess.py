"""k2m-preprocess: jsonl/text -> megatron .bin/.idx -> the same text back, for both tokenizers."""
from __future__ import annotations

import filecmp
import gzip
import json
import re

import pytest

from harness.data_helpers import CORPUS, SAMPLE_PREFIX, TIKTOKEN, corpus_texts
from k2mcore.cli.preprocess import main
from k2mcore.data.indexed import read_meta
from k2mcore.data.preprocess import preprocess
from k2mcore.data.tokenizers import load_tokenizer


def _read_docs(prefix: str) -> list[list[int]]:
    """Documents back through megatron's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """Real text under two keys, with empty documents mixed in."""
    texts = corpus_texts(120, start=200)
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "title": text.split("\n")[0], "id": i}) + "\n")
            if i % 40 == 0:
                f.write(json.dumps({"text": "  \n", "title": "", "id": -1}) + "\n")
    return path, texts


@pytest.mark.parametrize("which", [0, 1], ids=["tokenizer.json", "tiktoken"])
def test_round_trip_through_indexed_dataset(trained_tokenizers, jsonl, tmp_path, which):
    path, texts = jsonl
    tok_path = trained_tokenizers[which]
    tok = load_tokenizer(tok_path)
    prefix = str(tmp_path / "out" / "corpus")
    stats = preprocess([str(path)], prefix, str(tok_path), json_keys=["text", "title"],
                       append_eod=True, workers=1, progress=False)
    assert stats.outputs == [f"{prefix}_text_document", f"{prefix}_title_document"]
    assert stats.skipped_empty == 2 * 3  # three empty lines, two keys each
    docs = _read_docs(f"{prefix}_text_document")
    assert len(docs) == len(texts)
    for ids, text in zip(docs, texts):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.decode(ids[:-1]) == text  # text -> tokens -> .bin -> tokens -> text
    titles = _read_docs(f"{prefix}_title_document")
    assert [tok.decode(t[:-1]) for t in titles] == [t.split("\n")[0] for t in texts]
    meta = read_meta(f"{prefix}_text_document")
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert meta["documents"] == len(texts) and meta["tokens"] == sum(map(len, docs))


def test_two_workers_write_identical_files(jsonl, tmp_path):
    path, _ = jsonl
    outs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        preprocess([str(path)], prefix, str(TIKTOKEN), append_eod=True, workers=workers,
                   progress=False)
        outs.append(f"{prefix}_text_document")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(outs[0] + ext, outs[1] + ext, shallow=False)


def test_plain_text_paragraphs_and_gzip(tmp_path):
    texts = corpus_texts(5, start=50)
    raw = "\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n"
    src = tmp_path / "book.txt.gz"
    with gzip.open(src, "wt") as f:
        f.write(raw)
    tok = load_tokenizer(TIKTOKEN)
    stats = preprocess([str(src)], str(tmp_path / "book"), str(TIKTOKEN), progress=False)
    docs = _read_docs(stats.outputs[0])
    assert [tok.decode(d) for d in docs] == [t.replace("\n\n", "\n") + "\n" for t in texts]


def test_shipped_dataset_matches_shipped_corpus_and_tokenizer(tmp_path):
    """The bundled .bin/.idx are exactly the bundled corpus through the bundled tokenizer."""
    stats = preprocess([str(CORPUS)], str(tmp_path / "stdlib_docs"), str(TIKTOKEN),
                       append_eod=True, workers=1, progress=False)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(stats.outputs[0] + ext, str(SAMPLE_PREFIX) + ext, shallow=False)


def test_cli(jsonl, tmp_path, capsys):
    path, texts = jsonl
    prefix = tmp_path / "cli"
    rc = main(["--input", str(path), "--output-prefix", str(prefix), "--tokenizer",
               str(TIKTOKEN), "--append-eod", "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{len(texts)} documents" in out and "tokens/s" in out
    assert (tmp_path / "cli_text_document.bin").is_file()
    assert (tmp_path / "cli_text_document.idx").is_file()


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"}\n{"text": "broken', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "fine"}\n{"body": "x"}',
     r"bad\.jsonl:2: no key 'text' \(--json-keys; this line has 'body'\)"),
    ('{"text": 3}', r"bad\.jsonl:1: 'text' is a int, not text"),
    ('{"text": ""}\n{"text": " "}', r"no non-empty 'text' documents in .*bad\.jsonl"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(line + "\n")
    rc = main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
               str(TIKTOKEN), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not list(tmp_path.glob("o_*"))  # no half-written outputs
