"""Regenerate k2mcore/data/assets: the sample corpus, the k2-tiny tokenizer, its .bin/.idx, and
the chat sample (conversations, the k2-tiny tokenizer directory with its chat template, their
token ids and loss masks).

    python tools/make_sample_assets.py              # everything
    python tools/make_sample_assets.py --chat-only  # the chat sample, from the shipped corpus

The corpus is the docstrings (>= 300 characters) of the CPython standard library this
interpreter ships (PSF license), one JSON line each. The tokenizer is a byte-level BPE with
Kimi-K2's split regex trained on that corpus: 768 BPE ranks + K2's 256 reserved special tokens
= 1024 ids (k2-tiny's model.vocab_size), written as a tiktoken file and as an equivalent
tokenizer.json. The dataset is the corpus preprocessed with the tiktoken file and --append-eod.
Output depends on the Python version (recorded in assets/README.md); the test suite checks that
the shipped .bin/.idx match the shipped corpus and tokenizer.

The chat sample is derived from the shipped corpus alone (so `--chat-only` reproduces it under any
Python): `tokenizer/k2-tiny/` is k2-tiny.tokenizer.json (a byte copy) with a tokenizer_config.json
holding K2's named special tokens and the K2-style chat template (k2mcore.data.chat.template);
`sample/stdlib_chat.jsonl` is a few hundred conversations about documented functions, classes
and modules, the assistant answering with their docstrings (single and multi-turn, some with a
system turn, some through a `lookup_docstring` tool call), drawn by a seeded RNG; the
`stdlib_chat_{input_ids,loss_mask}_document` datasets are that file through `k2m-preprocess --chat`.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from k2mcore.data.chat.preprocess import preprocess_chat  # noqa: E402
from k2mcore.data.chat.template import write_tokenizer_dir  # noqa: E402
from k2mcore.data.preprocess import preprocess  # noqa: E402
from k2mcore.data.tokenizers import train_k2_bpe  # noqa: E402

ASSETS = ROOT / "k2mcore" / "data" / "assets"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo",
             "dist-packages"}
MIN_CHARS = 300
VOCAB_SIZE = 1024
CHAT_SEED = 20240711
CHAT_EVERY = 3  # one conversation per CHAT_EVERY corpus documents
CHAT_SYSTEM = "You answer questions about the Python standard library from its documentation."
TOOL_NAME = "lookup_docstring"
QUESTIONS = ("What does `{q}` do?", "Explain `{q}`.", "What is `{q}` for?",
             "Can you describe `{q}` from the Python standard library?")
MODULE_QUESTIONS = ("What is the `{q}` module for?", "Explain the `{q}` module.")


def stdlib_docstrings(root: Path) -> list[dict]:
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_CHARS:
                    where = getattr(node, "name", "<module>")
                    docs.append({"text": text, "source": f"{rel.as_posix()}:{where}"})
    return docs


def _qualname(source: str) -> tuple[str, bool]:
    """"json/__init__.py:<module>" -> ("json", True); "os.py:walk" -> ("os.walk", False)."""
    path, name = source.rsplit(":", 1)
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return (module, True) if name == "<module>" else (f"{module}.{name}", False)


def _paragraphs(text: str, limit: int = 600) -> list[str]:
    """Blank-line paragraphs, each cut at a line end within `limit` characters."""
    out = []
    for para in (p.strip() for p in text.split("\n\n")):
        if para:
            out.append(para if len(para) <= limit else para[:limit].rsplit("\n", 1)[0])
    return out


def chat_conversations(docs: list[dict]) -> list[dict]:
    """Conversations about every CHAT_EVERY-th document, six kinds in turn (seeded phrasing)."""
    rng = random.Random(CHAT_SEED)

    def ask(doc: dict) -> str:
        q, is_module = _qualname(doc["source"])
        return rng.choice(MODULE_QUESTIONS if is_module else QUESTIONS).format(q=q)

    def tool_turns(doc: dict, index: int) -> list[dict]:
        q, _ = _qualname(doc["source"])
        call_id = f"functions.{TOOL_NAME}:{index}"  # K2's call ids: functions.NAME:IDX
        call = {"id": call_id, "type": "function",
                "function": {"name": TOOL_NAME, "arguments": json.dumps({"name": q})}}
        return [
            {"role": "user", "content": f"Look up the documentation of `{q}` and summarize it."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": doc["text"][:800]},
            {"role": "assistant", "content": "According to its docstring: "
                                             + _paragraphs(doc["text"])[0]},
        ]

    out = []
    picked, others = docs[::CHAT_EVERY], docs[1::CHAT_EVERY]
    for i, doc in enumerate(picked):
        paras = _paragraphs(doc["text"])
        kind = i % 6
        if kind == 0:
            messages = [{"role": "user", "content": ask(doc)},
                        {"role": "assistant", "content": paras[0]}]
        elif kind == 1:
            messages = [{"role": "system", "content": CHAT_SYSTEM},
                        {"role": "user", "content": ask(doc)},
                        {"role": "assistant", "content": paras[0]}]
        elif kind == 2:
            more = paras[1] if len(paras) > 1 else "That is all its documentation says."
            messages = [{"role": "user", "content": ask(doc)},
                        {"role": "assistant", "content": paras[0]},
                        {"role": "user", "content": rng.choice(("Tell me more.", "Go on.",
                                                                "Any details?"))},
                        {"role": "assistant", "content": more}]
        elif kind == 3:
            messages = tool_turns(doc, 0)
        elif kind == 4:
            other = others[i % len(others)]
            question = ask(other)
            messages = [{"role": "user", "content": ask(doc)},
                        {"role": "assistant", "content": paras[0]},
                        {"role": "user", "content": "And " + question[0].lower() + question[1:]},
                        {"role": "assistant", "content": _paragraphs(other["text"])[0]}]
        else:
            first = [{"role": "system", "content": CHAT_SYSTEM},
                     {"role": "user", "content": ask(doc)},
                     {"role": "assistant", "content": paras[0]}]
            other = others[i % len(others)]
            messages = first + tool_turns(other, 0)
        out.append({"messages": messages, "source": doc["source"]})
    return out


def make_chat_assets() -> None:
    """The chat sample from the shipped corpus and k2-tiny.tokenizer.json."""
    tok_dir = write_tokenizer_dir(ASSETS / "tokenizer" / "k2-tiny.tokenizer.json",
                                  ASSETS / "tokenizer" / "k2-tiny")
    with open(ASSETS / "sample" / "stdlib_docs.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    chat = ASSETS / "sample" / "stdlib_chat.jsonl"
    with open(chat, "w", encoding="utf-8") as f:
        for conversation in chat_conversations(docs):
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    stats = preprocess_chat([str(chat)], str(ASSETS / "sample" / "stdlib_chat"), str(tok_dir),
                            progress=False)
    print(f"chat: {stats.written} conversations, {stats.tokens} tokens "
          f"({stats.assistant_tokens} assistant), {chat.stat().st_size} bytes of jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chat-only", action="store_true",
                        help="only the chat sample, from the shipped corpus and tokenizer")
    if parser.parse_args().chat_only:
        make_chat_assets()
        return
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = stdlib_docstrings(stdlib)
    (ASSETS / "sample").mkdir(parents=True, exist_ok=True)
    corpus = ASSETS / "sample" / "stdlib_docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    _, tiktoken_path = train_k2_bpe((d["text"] for d in docs), VOCAB_SIZE,
                                    ASSETS / "tokenizer", "k2-tiny")
    stats = preprocess([str(corpus)], str(ASSETS / "sample" / "stdlib_docs"),
                       str(tiktoken_path), append_eod=True, progress=False)
    shutil.copyfile(stdlib / "LICENSE.txt", ASSETS / "LICENSE-PSF.txt")
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"Python {version}: {len(docs)} documents, {stats.tokens} tokens, "
          f"{corpus.stat().st_size} bytes of jsonl")
    make_chat_assets()


if __name__ == "__main__":
    main()
