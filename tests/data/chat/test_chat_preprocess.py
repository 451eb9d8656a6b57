"""k2m-preprocess --chat: jsonl conversations -> ids + loss-mask datasets that read back as
encode_chat; truncation and dropping, counts, workers, the shipped sample, bad input."""
from __future__ import annotations

import filecmp
import importlib.util
import json
import re
from pathlib import Path

import pytest

from harness.data_helpers import (
    CHAT_CORPUS,
    CHAT_PREFIX,
    CONVERSATIONS,
    CORPUS,
    TOKENIZER_DIR,
    TOKENIZER_JSON,
)
from k2mcore.cli.preprocess import main
from k2mcore.data import encode_chat, preprocess_chat
from k2mcore.data.chat.template import write_tokenizer_dir
from k2mcore.data.indexed import read_meta
from k2mcore.errors import DataError

ROOT = Path(__file__).resolve().parents[3]


def _read(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _write(path: Path, conversations) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """CONVERSATIONS and 40 shipped ones, with blank lines between."""
    with open(CHAT_CORPUS) as f:
        shipped = [json.loads(line)["messages"] for line in f.readlines()[:40]]
    conversations = CONVERSATIONS + shipped
    path = tmp_path_factory.mktemp("chat") / "chats.jsonl"
    _write(path, conversations)
    path.write_text(path.read_text().replace("\n", "\n\n", 3))
    return path, conversations


def test_round_trip_equals_encode_chat(jsonl, tmp_path):
    path, conversations = jsonl
    stats = preprocess_chat([str(path)], str(tmp_path / "c"), str(TOKENIZER_DIR), progress=False)
    ids_prefix, mask_prefix = stats.outputs
    assert (ids_prefix, mask_prefix) == (f"{tmp_path}/c_input_ids_document",
                                         f"{tmp_path}/c_loss_mask_document")
    expected = [encode_chat(m, TOKENIZER_DIR) for m in conversations]
    assert _read(ids_prefix) == [ids for ids, _ in expected]
    assert _read(mask_prefix) == [mask for _, mask in expected]
    counts = {"read": len(conversations), "written": len(conversations), "truncated": 0,
              "dropped": 0, "with_special_text": 2,  # CONVERSATIONS[3] and [4]
              "tokens": sum(len(i) for i, _ in expected),
              "assistant_tokens": sum(sum(m) for _, m in expected)}
    assert stats.counts() == counts
    for prefix in stats.outputs:
        meta = read_meta(prefix)
        assert meta["format"] == "chat" and meta["tokenizer"]["path"] == "k2-tiny/tokenizer.json"
        assert {k: meta[k] for k in counts} == counts
        assert meta["tokenizer"]["fingerprint"] == "7d982710f29d92dc"  # k2-tiny's, any format


def test_tool_schemas_per_line(tmp_path):
    tools = [{"type": "function", "function": {"name": "lookup_docstring", "parameters": {}}}]
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATIONS[2], "tools": tools}) + "\n"
                   + json.dumps({"messages": CONVERSATIONS[0], "id": 7}) + "\n")
    stats = preprocess_chat([str(src)], str(tmp_path / "t"), str(TOKENIZER_DIR), progress=False)
    assert _read(stats.outputs[0]) == [encode_chat(CONVERSATIONS[2], TOKENIZER_DIR, tools=tools)[0],
                                       encode_chat(CONVERSATIONS[0], TOKENIZER_DIR)[0]]


def test_plain_special_text_option(jsonl, tmp_path):
    path, conversations = jsonl
    stats = preprocess_chat([str(path)], str(tmp_path / "p"), str(TOKENIZER_DIR),
                            special_tokens_in_content="plain", progress=False)
    assert stats.with_special_text == 2
    expected = [encode_chat(m, TOKENIZER_DIR, special_tokens_in_content="plain")[0]
                for m in conversations]
    assert _read(stats.outputs[0]) == expected
    assert read_meta(stats.outputs[0])["special_tokens_in_content"] == "plain"


def test_truncate_and_drop(tmp_path):
    lengths = [len(encode_chat(m, TOKENIZER_DIR)[0]) for m in CONVERSATIONS]
    first_trained = [encode_chat(m, TOKENIZER_DIR)[1].index(1) for m in CONVERSATIONS]
    limit = sorted(lengths)[2]  # two conversations fit, the others are longer
    path = _write(tmp_path / "c.jsonl", CONVERSATIONS)
    # truncation keeps a conversation only if an assistant token is left within the limit
    cut_to_nothing = sum(n > limit and t >= limit for n, t in zip(lengths, first_trained))
    over = sum(n > limit for n in lengths)
    t = preprocess_chat([str(path)], str(tmp_path / "t"), str(TOKENIZER_DIR), max_length=limit,
                        progress=False)
    assert (t.read, t.truncated, t.dropped) == (5, over - cut_to_nothing, cut_to_nothing)
    assert t.written == 5 - cut_to_nothing
    docs = _read(t.outputs[0])
    assert max(map(len, docs)) == limit and len(docs) == t.written
    kept = [m for m, n, f in zip(CONVERSATIONS, lengths, first_trained)
            if n <= limit or f < limit]
    assert docs == [encode_chat(m, TOKENIZER_DIR)[0][:limit] for m in kept]
    d = preprocess_chat([str(path)], str(tmp_path / "d"), str(TOKENIZER_DIR), max_length=limit,
                        overlong="drop", progress=False)
    assert (d.read, d.written, d.truncated, d.dropped) == (5, 5 - over, 0, over)
    assert sorted(map(len, _read(d.outputs[0]))) == sorted(n for n in lengths if n <= limit)


def test_two_workers_write_identical_files(jsonl, tmp_path):
    path, _ = jsonl
    outs = []
    for workers in (1, 2):
        stats = preprocess_chat([str(path)], str(tmp_path / f"w{workers}"), str(TOKENIZER_DIR),
                                workers=workers, chunk_size=4, progress=False)
        outs.append(stats.outputs)
    for a, b in zip(*outs):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(a + ext, b + ext, shallow=False)


def test_cli_summary(jsonl, tmp_path, capsys):
    path, conversations = jsonl
    rc = main(["--chat", "--input", str(path), "--output-prefix", str(tmp_path / "cli"),
               "--tokenizer", str(TOKENIZER_DIR), "--max-length", "64", "--overlong", "drop",
               "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(conversations)} conversations read" in out and "dropped (--max-length 64" in out
    assert "2 with special-token text in content (parsed)" in out and "assistant tokens" in out
    assert (tmp_path / "cli_loss_mask_document.idx").is_file()
    # real tokens against padding at train.seq_length = --max-length - 1 (what a row holds)
    from k2mcore.data.chat.packing import packing_efficiency
    from k2mcore.data.indexed import read_index

    eff = packing_efficiency(read_index(str(tmp_path / "cli_input_ids_document"))
                             .sequence_lengths, 63)
    assert f"packing at train.seq_length=63: {eff.describe()}" in out
    assert 0 < eff.padded_to_seq_length <= eff.packed <= 1


@pytest.mark.parametrize("args, message", [
    (["--append-eod"], r"--append-eod: not with --chat"),
    (["--json-keys", "text"], r"--json-keys: not with --chat"),
    (["--pack-length", "0"], r"--pack-length: 0 must be >= 1"),
])
def test_cli_flag_conflicts(tmp_path, capsys, args, message):
    rc = main(["--chat", "--input", str(CHAT_CORPUS), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer", str(TOKENIZER_DIR), *args])
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    rc = main(["--input", str(CORPUS), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer", str(TOKENIZER_JSON), "--max-length", "8"])
    assert rc == 2 and "--max-length needs --chat" in capsys.readouterr().err


def test_shipped_chat_sample_is_reproducible(tmp_path):
    """The bundled conversations are tools/make_sample_assets.py's, from the shipped corpus,
    and the bundled datasets are exactly those conversations through the bundled directory."""
    spec = importlib.util.spec_from_file_location("make_assets",
                                                  ROOT / "tools" / "make_sample_assets.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with open(CORPUS, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    lines = [json.dumps(c, ensure_ascii=False) + "\n" for c in tool.chat_conversations(docs)]
    assert "".join(lines) == CHAT_CORPUS.read_text(encoding="utf-8")
    stats = preprocess_chat([str(CHAT_CORPUS)], str(tmp_path / "stdlib_chat"),
                            str(TOKENIZER_DIR), progress=False)
    shipped = [f"{CHAT_PREFIX}_input_ids_document", f"{CHAT_PREFIX}_loss_mask_document"]
    for made, ship in zip(stats.outputs, shipped):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(made + ext, ship + ext, shallow=False), ship + ext
        assert read_meta(made) == read_meta(ship)
    kinds = [[m["role"] for m in json.loads(line)["messages"]] for line in lines]
    assert 300 <= len(kinds) <= 600
    assert sum("tool" in k for k in kinds) > 50 and sum(k[0] == "system" for k in kinds) > 50
    assert sum(k.count("assistant") > 1 for k in kinds) > 100


# --- bad input: one line naming the file and line ---------------------------------------------
GOOD = json.dumps({"messages": CONVERSATIONS[0]})


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"bad\.jsonl:2: invalid JSON"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"text": "hi"}', r"bad\.jsonl:2: no 'messages' list"),
    ('{"messages": []}', r"bad\.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"content": "hi"}]}', r"bad\.jsonl:2: message 0 has no 'role'"),
    ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:2: message 0 \(user\) has no 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     r"bad\.jsonl:2: message 1 has unknown role 'bot' \(expected system, user, assistant, tool\)"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}',
     r"bad\.jsonl:2: message 0 \(user\): 'content' must be a string or a list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
     '"tools": {"name": "f"}}', r"bad\.jsonl:2: 'tools' must be a list of tool schemas"),
    ('{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
     r"bad\.jsonl:2: no assistant turn \(nothing to train on\)"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "tool", "content": "r"}, {"role": "assistant", "content": "c"}]}',
     r"bad\.jsonl:2: the chat template of .*k2-tiny does not render this conversation "
     r"\(TemplateError: a tool message needs a tool_call_id\)"),
])
def test_bad_lines(tmp_path, capsys, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(GOOD + "\n" + line + "\n" + GOOD + "\n")
    rc = main(["--chat", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer", str(TOKENIZER_DIR), "--no-progress", "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not list(tmp_path.glob("o_*"))  # no half-written outputs


def _dir(tmp_path, template):
    return write_tokenizer_dir(TOKENIZER_JSON, tmp_path / "tok", chat_template=template)


def test_template_that_fails_to_render(tmp_path):
    d = _dir(tmp_path, "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                       "{{ 1 // (messages | length - 2) }}{% endfor %}")
    src = _write(tmp_path / "c.jsonl", [CONVERSATIONS[1], CONVERSATIONS[0]])
    with pytest.raises(DataError, match=r"c\.jsonl:2: the chat template of .*tok does not render "
                                        r"this conversation \(ZeroDivisionError"):
        preprocess_chat([str(src)], str(tmp_path / "o"), str(d), progress=False)


@pytest.mark.parametrize("template, message", [
    (None, r"--tokenizer: .*tok/tokenizer_config\.json has no chat_template"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}",
     r"--tokenizer: the chat template in .*tokenizer_config\.json has no \{% generation %\} block"),
    ("{% generation %}{{ m.content ", r"--tokenizer: the chat template in .* does not compile"),
])
def test_unusable_tokenizer_directory(tmp_path, template, message):
    d = _dir(tmp_path, template or "")
    if template is None:
        config = json.loads((d / "tokenizer_config.json").read_text())
        del config["chat_template"]
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=message) as err:
        preprocess_chat([str(CHAT_CORPUS)], str(tmp_path / "o"), str(d), progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"--tokenizer: .*k2-tiny\.tokenizer\.json is not a "
                                        r"tokenizer directory"):
        preprocess_chat([str(CHAT_CORPUS)], str(tmp_path / "o"), str(TOKENIZER_JSON),
                        progress=False)


def test_encode_chat_errors_name_the_messages():
    with pytest.raises(DataError, match=r"^messages: message 1 has unknown role 'bot'"):
        encode_chat([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
                    TOKENIZER_DIR)
