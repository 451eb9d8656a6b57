"""Prompts for `k2m-rl`: a JSON-lines file, one single-turn task per line.

    {"prompt": "What is 17 + 25?", "answer": "42"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "answer": "42", "id": "gsm-17", "budget": 256}

`prompt` (a user message) or `messages` (no assistant turn: single-turn tasks), rendered by the
tokenizer's chat template with the assistant's header appended (transformers'
`apply_chat_template(add_generation_prompt=True)`); `answer` is what a verifiable reward checks
(a string; numbers are taken as their text); `id` names the prompt in errors and seeds its
sampling (default `<file name>:<line>`); `budget` is its task's budget of new tokens (default
`rl.max_new_tokens`). The prompt and its budget must fit `train.seq_length + 1` tokens. Problems
are one-line DataErrors naming file:line, found before any process group starts.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from k2mcore.errors import DataError

from .engine import Prompt


def chat_tokenizer(name: str, key: str = "data.tokenizer") -> Any:
    """transformers' tokenizer of a Hugging Face tokenizer directory with a chat template."""
    from k2mcore.data.datasets import resolve_path

    path = resolve_path(name)
    if not os.path.isdir(path):
        raise DataError(f"{key}: {name} is not a tokenizer directory (k2m-rl renders prompts "
                        f"with its chat template)")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        raise DataError(f"{key}: {name} has no chat template")
    return tok


def stop_ids(tok: Any) -> list[int]:
    """The tokens that end an answer: the chat's end of turn (<|im_end|>) and the eos."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tok.unk_token_id:
        ids.add(end)
    return sorted(ids)


def load_prompts(path: str, tok: Any, *, seq_length: int, budget: int,
                 key: str = "rl.prompts") -> list[Prompt]:
    """Every prompt of the file, checked (see the module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"{key}: {path} not found")
    name = os.path.basename(path)
    out, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            prompt = _one(line, where, f"{name}:{n}", tok, seq_length, budget)
            if prompt.key in seen:
                raise DataError(f"{where}: id {prompt.key!r} already used at line {seen[prompt.key]}")
            seen[prompt.key] = n
            out.append(prompt)
    if not out:
        raise DataError(f"{key}: {path} holds no prompt")
    return out


def _one(line: str, where: str, default_id: str, tok: Any, seq_length: int,
         budget: int) -> Prompt:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or ("prompt" in doc) == ("messages" in doc):
        raise DataError(f"{where}: a prompt line has either 'prompt' (text) or 'messages'")
    if "prompt" in doc:
        if not isinstance(doc["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string")
        messages = [{"role": "user", "content": doc["prompt"]}]
    else:
        messages = doc["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user") for m in messages):
            raise DataError(f"{where}: 'messages' must be system and user messages (single-turn "
                            f"tasks: no assistant turn)")
    answer = doc.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number")
    pid = doc.get("id", default_id)
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise DataError(f"{where}: 'id' must be a string or an integer")
    own: Optional[int] = doc.get("budget")
    if own is not None and (isinstance(own, bool) or not isinstance(own, int) or own < 1):
        raise DataError(f"{where}: 'budget' must be a positive integer, got {own!r}")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    need = len(ids) + (own or budget)
    if need > seq_length + 1:
        raise DataError(f"{where}: the prompt has {len(ids)} tokens and its budget "
                        f"{own or budget} new tokens: {need} > train.seq_length+1="
                        f"{seq_length + 1} (shorten it, lower the budget or raise "
                        f"train.seq_length)")
    text = messages[-1]["content"] if isinstance(messages[-1]["content"], str) else ""
    return Prompt(tuple(int(i) for i in ids), str(pid), text,
                  None if answer is None else str(answer), own)
