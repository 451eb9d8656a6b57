"""Regenerate k2mcore/data/assets: the sample corpus, the k2-tiny tokenizer, its .bin/.idx.

    python tools/make_sample_assets.py

The corpus is the docstrings (>= 300 characters) of the CPython standard library this
interpreter ships (PSF license), one JSON line each. The tokenizer is a byte-level BPE with
Kimi-K2's split regex trained on that corpus: 768 BPE ranks + K2's 256 reserved special tokens
= 1024 ids (k2-tiny's model.vocab_size), written as a tiktoken file and as an equivalent
tokenizer.json. The dataset is the corpus preprocessed with the tiktoken file and --append-eod.
Output depends on the Python version (recorded in assets/README.md); the test suite checks that
the shipped .bin/.idx match the shipped corpus and tokenizer.
"""
from __future__ import annotations

import ast
import json
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from k2mcore.data.preprocess import preprocess  # noqa: E402
from k2mcore.data.tokenizers import train_k2_bpe  # noqa: E402

ASSETS = ROOT / "k2mcore" / "data" / "assets"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo",
             "dist-packages"}
MIN_CHARS = 300
VOCAB_SIZE = 1024


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


def main() -> None:
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


if __name__ == "__main__":
    main()
