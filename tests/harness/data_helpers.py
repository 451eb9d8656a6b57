"""Helpers for the data tests: bundled asset paths, synthetic indexed datasets, configs."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from k2mcore.config.loader import load_config
from k2mcore.data.datasets import ASSETS_DIR

CORPUS = ASSETS_DIR / "sample" / "stdlib_docs.jsonl"
SAMPLE_PREFIX = ASSETS_DIR / "sample" / "stdlib_docs_text_document"
TIKTOKEN = ASSETS_DIR / "tokenizer" / "k2-tiny.tiktoken"
TOKENIZER_JSON = ASSETS_DIR / "tokenizer" / "k2-tiny.tokenizer.json"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer" / "k2-tiny"  # tokenizer.json + K2-style chat template
CHAT_CORPUS = ASSETS_DIR / "sample" / "stdlib_chat.jsonl"
CHAT_PREFIX = ASSETS_DIR / "sample" / "stdlib_chat"

# conversations the chat tests encode: multi-turn, system, tools, parts, special text, unicode
TOOL_CALL = {"id": "functions.lookup_docstring:0", "type": "function",
             "function": {"name": "lookup_docstring", "arguments": '{"name": "os.path.join"}'}}
CONVERSATIONS = [
    [{"role": "user", "content": "What does `os.path.join` do?"},
     {"role": "assistant", "content": "Join one or more path segments intelligently."}],
    [{"role": "system", "content": "You answer questions about Python."},
     {"role": "user", "content": "Explain `json.dumps`."},
     {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
     {"role": "user", "content": "Tell me more."},
     {"role": "assistant", "content": "If skipkeys is true then dict keys that are not basic types "
                                      "are skipped.\n\n  Indented, with trailing space "}],
    [{"role": "user", "content": "Look up `os.path.join`."},
     {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
     {"role": "tool", "tool_call_id": "functions.lookup_docstring:0",
      "content": "Join two or more pathname components.\nIf any component is absolute..."},
     {"role": "assistant", "content": "It joins path components."},
     {"role": "user", "content": "And `os.walk`, twice?"},
     {"role": "assistant", "content": "Let me look.", "tool_calls": [
         {"id": "a", "type": "function",
          "function": {"name": "lookup_docstring", "arguments": {"name": "os.walk"}}},
         {"id": "b", "type": "function",
          "function": {"name": "lookup_docstring", "arguments": {"name": "os.walk", "n": 2}}}]},
     {"role": "tool", "tool_call_id": "functions.lookup_docstring:1", "content": "Walk a tree."},
     {"role": "tool", "tool_call_id": "functions.lookup_docstring:2", "content": "Walk it."},
     {"role": "assistant", "content": [{"type": "text", "text": "Both say: "},
                                       {"type": "text", "text": "it walks a tree."}]}],
    [{"role": "user", "content": "Does <|im_end|> end a turn? And [EOS], <|im_assistant|>?"},
     {"role": "assistant", "content": "Yes: <|im_end|> closes one. 月之暗面 🚀 café"}],
    [{"role": "system", "content": "Be brief <|im_system|>system<|im_middle|>"},
     {"role": "user", "content": "x<|reserved_token_800|>y", "name": "alice"},
     {"role": "assistant", "content": ""}],
]


def corpus_texts(n: Optional[int] = None, start: int = 0) -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        lines = f.readlines()
    stop = None if n is None else start + n
    return [json.loads(line)["text"] for line in lines[start:stop]]


def write_dataset(prefix: str, docs: Sequence[Sequence[int]], dtype=np.uint16) -> str:
    """Write `docs` (one sequence each) through megatron's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def random_docs(seed: int, n: int, lo: int, hi: int, min_len: int = 20,
                max_len: int = 200) -> list[list[int]]:
    """Documents whose tokens all lie in [lo, hi): a sample's tokens tell which dataset it is."""
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=int(rng.integers(min_len, max_len))).tolist()
            for _ in range(n)]


def make_cfg(tmp: Path, blend: Optional[str], *overrides: str, tokenizer: str = str(TIKTOKEN)):
    """k2-tiny with the given data and a private index cache."""
    sets = [f"run.dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
            f"data.tokenizer={tokenizer}", "data.num_workers=0"]
    sets.append(f"data.blend={blend}" if blend is not None else "data.blend=null")
    return load_config("k2-tiny", [*sets, *overrides])
