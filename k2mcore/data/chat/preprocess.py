"""`k2m-preprocess --chat`: conversations (jsonl) -> token ids and loss masks, megatron's format.

Each input line is `{"messages": [...]}`, with the conversation's tool schemas under `"tools"` if
it declares any (k2mcore.data.chat.encoding names the message rules); other keys are ignored. Every
conversation is encoded by `ChatTokenizer.encode` (the tokenizer directory's chat template, mask on
its `{% generation %}` spans) and written as one document to two megatron indexed datasets with
identical document lengths:

    <output-prefix>_input_ids_document.{bin,idx}   token ids (megatron's dtype for the vocab)
    <output-prefix>_loss_mask_document.{bin,idx}   uint8, 1 on the assistant tokens

plus, for each, the `.json` sidecar of the text path (tokenizer fingerprint) with the chat counts.
`<output-prefix>` is what a chat `data.blend` names (k2mcore.data.chat.dataset).

`max_length`: a conversation of more tokens is cut to its first `max_length` (`overlong=
"truncate"`; dropped after all when the cut leaves no assistant token) or dropped (`"drop"`);
both are counted. Lines are encoded in `workers` processes, in order, so the output does not
depend on the number of workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from k2mcore.data import pipeline
from k2mcore.data.indexed import write_meta
from k2mcore.errors import DataError

from .encoding import SPECIAL_TEXT_MODES, ChatTokenizer, load_chat_tokenizer

OVERLONG = ("truncate", "drop")
IDS_SUFFIX = "_input_ids_document"
MASK_SUFFIX = "_loss_mask_document"


def chat_output_prefixes(prefix: str) -> tuple[str, str]:
    """(ids prefix, mask prefix) of a chat dataset named `prefix`."""
    return prefix + IDS_SUFFIX, prefix + MASK_SUFFIX


@dataclass
class ChatStats(pipeline.PipelineStats):
    read: int = 0  # conversations (non-blank lines)
    written: int = 0
    truncated: int = 0  # written, cut to max_length
    dropped: int = 0  # longer than max_length (or cut to no assistant token)
    with_special_text: int = 0  # read; content held special-token text
    assistant_tokens: int = 0  # written, mask 1

    @property
    def conversations_per_s(self) -> float:
        return self.per_second(self.read)

    def counts(self) -> dict:
        return {k: getattr(self, k) for k in ("read", "written", "truncated", "dropped",
                                              "with_special_text", "tokens", "assistant_tokens")}


# --- encoding (in worker processes) ------------------------------------------------------------
_CHAT: Optional[ChatTokenizer] = None
_MODE = "parse"
_MAX_LENGTH: Optional[int] = None
_OVERLONG = "truncate"
_DTYPE: type = np.int32

# One line's result: (ids or None when dropped, mask, "ok"|"truncated"|"dropped", special text,
# bytes read)
_Result = tuple[Optional[np.ndarray], Optional[np.ndarray], str, bool, int]


def _init_worker(chat: ChatTokenizer, mode: str, max_length: Optional[int], overlong: str,
                 dtype: type) -> None:
    global _CHAT, _MODE, _MAX_LENGTH, _OVERLONG, _DTYPE
    _CHAT, _MODE, _MAX_LENGTH, _OVERLONG, _DTYPE = chat, mode, max_length, overlong, dtype


def _encode(item: tuple[str, int, bytes, str]) -> _Result:
    path, lineno, raw, _ = item
    where = f"{path}:{lineno}"
    doc = pipeline.json_object(raw, where)
    if not isinstance(doc.get("messages"), list):
        raise DataError(f"{where}: no 'messages' list (a chat line is "
                        f"{{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}})")
    enc = _CHAT.encode(doc["messages"], where, _MODE, tools=doc.get("tools"))
    ids, mask, status = enc.ids, enc.mask, "ok"
    if _MAX_LENGTH is not None and len(ids) > _MAX_LENGTH:
        ids, mask = ids[:_MAX_LENGTH], mask[:_MAX_LENGTH]
        status = "truncated" if _OVERLONG == "truncate" and any(mask) else "dropped"
    if status == "dropped":
        return None, None, status, enc.special_text, len(raw)
    return (np.asarray(ids, dtype=_DTYPE), np.asarray(mask, dtype=np.uint8), status,
            enc.special_text, len(raw))


# --- driver -----------------------------------------------------------------------------------
def preprocess_chat(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_dir: str,
    *,
    max_length: Optional[int] = None,
    overlong: str = "truncate",
    special_tokens_in_content: str = "parse",
    workers: int = 1,
    progress: bool = True,
    chunk_size: int = 64,  # conversations per task sent to a worker
) -> ChatStats:
    """Encode the conversations of `inputs` (jsonl, .gz too) into `<output_prefix>` + IDS_SUFFIX
    and MASK_SUFFIX datasets; returns the counts."""
    if overlong not in OVERLONG:
        raise DataError(f"--overlong: {overlong!r} is not one of {', '.join(OVERLONG)}")
    if special_tokens_in_content not in SPECIAL_TEXT_MODES:
        raise DataError(f"--special-tokens-in-content: {special_tokens_in_content!r} is not one "
                        f"of {', '.join(SPECIAL_TEXT_MODES)}")
    if max_length is not None and max_length < 2:
        raise DataError(f"--max-length: {max_length} leaves no token to predict (need >= 2)")
    paths = pipeline.expand_inputs(inputs)
    chat = load_chat_tokenizer(tokenizer_dir, key="--tokenizer")
    dtype = pipeline.token_dtype(chat.text.vocab_size)
    prefixes = list(chat_output_prefixes(output_prefix))
    stats = ChatStats(outputs=prefixes)

    def rate(elapsed: float) -> str:
        return f"{stats.read / elapsed:.0f} conv/s, {stats.tokens / elapsed / 1e3:.1f}k tok/s"

    init = (chat, special_tokens_in_content, max_length, overlong, dtype)
    items = pipeline.read_items(paths, "jsonl", "line")
    with pipeline.DatasetWriter(prefixes, [dtype, np.uint8]) as out, pipeline.encoded(
            paths, items, _init_worker, init, _encode, workers=workers, chunk_size=chunk_size,
            progress=progress, rate=rate) as results:
        for ids, mask, status, special, nbytes in results:
            stats.read += 1
            stats.with_special_text += special
            stats.bytes += nbytes
            if ids is None:
                stats.dropped += 1
                continue
            stats.truncated += status == "truncated"
            out.add(0, ids)
            out.add(1, mask)
            stats.written += 1
            stats.tokens += ids.size
            stats.assistant_tokens += int(mask.sum())
        if stats.written == 0:
            raise DataError(f"--input: no conversation written from {', '.join(paths)} "
                            f"({stats.read} read, {stats.dropped} dropped by --max-length)")
        stats.seconds = results.elapsed()
    meta = {
        "format": "chat", "tokenizer": {**chat.text.describe(), "path": chat.text.name},
        "chat_template_sha256": chat.template_sha256,
        "special_tokens_in_content": special_tokens_in_content, "max_length": max_length,
        "overlong": overlong, "documents": stats.written, **stats.counts(),
        "inputs": [os.path.basename(x) for x in paths],
    }
    out.commit()
    write_meta(prefixes[0], {**meta, "loss_mask": os.path.basename(prefixes[1])})
    write_meta(prefixes[1], {**meta, "input_ids": os.path.basename(prefixes[0])})
    return stats
