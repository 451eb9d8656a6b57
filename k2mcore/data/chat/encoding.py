"""Chat data: a conversation rendered by its tokenizer's own chat template, with a loss mask.

`encode_chat(messages, tokenizer_dir)` returns `(input_ids, loss_mask)` equal to transformers'
`AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(messages, tokenize=True,
return_dict=True, return_assistant_tokens_mask=True)` (`input_ids`, `assistant_masks`): the
template (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`) is rendered by
transformers' own renderer with the same variables (the config's named special tokens), the text
is tokenized by the directory's `tokenizer.json` through the `tokenizers` library, as
transformers' fast tokenizers do, and a token is masked in when its characters overlap a span the
template's `{% generation %}` blocks rendered. transformers (with jinja2) is needed only here and
is imported on first use; `import k2mcore.data` does not import it.

The loss mask is what the template's `{% generation %}` blocks cover, nothing else: a template
without such a block is refused in one line (no guessing of assistant spans from the messages).

Special-token text inside messages ("<|im_end|>" typed by a user) is parsed into control tokens
by transformers, as anywhere in the rendered text; `special_tokens_in_content="parse"` (default)
does the same. `"plain"` keeps such text plain: every added token's text in a message (or tool
schema) string is wrapped in two private-use markers before rendering; the rendered text is then
cut only at the special tokens the template wrote (unmarked), and each piece between them —
content included, markers removed — is tokenized as plain text, exactly as the text path
tokenizes a document. The text is what transformers renders; only the ids of the marked text
change (to the ids of its characters), so no special id comes from content. A string that
already holds a marker character (U+F0000, U+F0001) is refused in plain mode.

Messages follow the OpenAI/Hugging Face convention: `role` one of system, user, assistant, tool;
`content` a string or a list of `{"type": "text", "text": ...}` parts (null or absent only in an
assistant message with `tool_calls`); `tool_calls` a list of `{"id", "type": "function",
"function": {"name", "arguments"}}`; a tool message carries `tool_call_id`. Tool schemas, when a
conversation declares them (`tools`), go to the template as apply_chat_template's `tools`. A
conversation needs an assistant turn. Problems are one-line DataErrors prefixed with where the
conversation came from.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from k2mcore.data.tokenizers import HF_CONFIG, PathLike, Tokenizer, load_tokenizer, read_hf_config
from k2mcore.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TEXT_MODES = ("parse", "plain")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers reads it before the config's entry
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names apply_chat_template hands the template
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                    "mask_token")
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")  # transformers' own test
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # plain mode: around content's special text


@dataclass
class EncodedChat:
    ids: list[int]
    mask: list[int]  # 1: an assistant token (inside a {% generation %} span)
    special_text: bool  # a message string holds special-token text


def _import_renderer():
    try:
        from transformers.utils.chat_template_utils import (
            _compile_jinja_template,
            render_jinja_template,
        )
    except ImportError as exc:
        raise DataError(f"chat data needs transformers and jinja2>=3.1.6 "
                        f"(pip install 'k2mcore[chat]'): {exc}") from None
    return render_jinja_template, _compile_jinja_template


def _read_template(directory: Path, config: dict, key: str) -> str:
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"{key}: {directory / HF_CONFIG} has no chat_template "
                        f"(nor is there a {CHAT_TEMPLATE_FILE}): the directory cannot render chats")
    return template


class ChatTokenizer:
    """A Hugging Face tokenizer directory as the chat path uses it: its template, the variables
    transformers renders it with, its tokenizer.json (parsing special tokens) and the text path's
    `Tokenizer` of the same directory (plain text; fingerprint, pad, vocab size)."""

    def __init__(self, directory: PathLike, key: str = "tokenizer_dir") -> None:
        from tokenizers import Tokenizer as _HF

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"{key}: {self.directory} is not a tokenizer directory (chat data "
                            f"needs one with tokenizer.json and a chat template)")
        if not (self.directory / "tokenizer.json").is_file():
            raise DataError(f"{key}: {self.directory} has no tokenizer.json")
        self.text: Tokenizer = load_tokenizer(self.directory, key=key)
        config = read_hf_config(self.directory)
        self.template = _read_template(self.directory, config, key)
        where = self.directory / (CHAT_TEMPLATE_FILE if (self.directory / CHAT_TEMPLATE_FILE)
                                  .is_file() else HF_CONFIG)
        if not _GENERATION_TAG.search(self.template):
            raise DataError(
                f"{key}: the chat template in {where} has no {{% generation %}} block, so the "
                f"assistant tokens to train on are unknown (wrap each assistant turn in "
                f"{{% generation %}}...{{% endgeneration %}})")
        self._render, compile_ = _import_renderer()
        try:
            compile_(self.template)
        except Exception as exc:  # jinja2's TemplateSyntaxError and friends
            raise DataError(f"{key}: the chat template in {where} does not compile "
                            f"({type(exc).__name__}: {exc})") from None
        self.variables = {}
        for attr in _TEMPLATE_TOKENS:
            value = config.get(attr)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                self.variables[attr] = value
        self._parse = _HF.from_file(str(self.directory / "tokenizer.json"))
        self._parse.encode_special_tokens = False  # transformers' default: specials are parsed
        self._plain = self.text._tok  # the text path's: encode_special_tokens=True
        added = sorted({t.content for t in self._parse.get_added_tokens_decoder().values()},
                       key=len, reverse=True)  # leftmost-longest, as the tokenizer matches
        alternatives = "|".join(map(re.escape, added)) or "(?!)"
        self._special_re = re.compile(alternatives)
        self._marked_re = re.compile(
            f"{_MARK_START}({alternatives}){_MARK_END}|({alternatives})|[{_MARK_START}{_MARK_END}]")

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def __getstate__(self) -> dict:  # worker processes re-load it
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, messages: Any, where: str = "messages",
               special_tokens_in_content: str = "parse", tools: Any = None) -> EncodedChat:
        """Validate, render, tokenize, mask. `where` prefixes every error ("file.jsonl:12");
        `tools`: the tool schemas handed to the template, as apply_chat_template's `tools`."""
        if special_tokens_in_content not in SPECIAL_TEXT_MODES:
            raise ValueError(f"special_tokens_in_content={special_tokens_in_content!r} is not one "
                             f"of {', '.join(SPECIAL_TEXT_MODES)}")
        messages = validate_messages(messages, where)
        if tools is not None and (not isinstance(tools, list)
                                  or not all(isinstance(t, dict) for t in tools)):
            raise DataError(f"{where}: 'tools' must be a list of tool schemas (JSON objects)")
        special = self._has_special_text([messages, tools])
        if special and special_tokens_in_content == "plain":
            ids, mask = self._encode_plain(messages, tools, where)
        else:
            ids, mask = self._encode_parsed(messages, tools, where)
        return EncodedChat(ids, mask, special)

    def _render_one(self, messages: list[dict], tools: Optional[list], where: str
                    ) -> tuple[str, list[tuple[int, int]]]:
        try:
            rendered, spans = self._render(
                conversations=[messages], tools=tools, chat_template=self.template,
                return_assistant_tokens_mask=True, add_generation_prompt=False, **self.variables)
        except Exception as exc:  # raise_exception's TemplateError, a TypeError in the template..
            raise DataError(f"{where}: the chat template of {self.directory} does not render "
                            f"this conversation ({type(exc).__name__}: {exc})") from None
        return rendered[0], spans[0]

    def _encode_parsed(self, messages: list[dict], tools: Optional[list], where: str
                       ) -> tuple[list[int], list[int]]:
        text, spans = self._render_one(messages, tools, where)
        enc = self._parse.encode(text, add_special_tokens=False)
        return enc.ids, _mask(enc.offsets, spans)

    def _encode_plain(self, messages: list[dict], tools: Optional[list], where: str
                      ) -> tuple[list[int], list[int]]:
        for s in _strings([messages, tools]):
            if _MARK_START in s or _MARK_END in s:
                raise DataError(f"{where}: a message or tool schema holds U+F0000/U+F0001, "
                                f"the markers --special-tokens-in-content plain reserves")
        marked_messages, marked_tools = _map_strings([messages, tools], lambda s: (
            self._special_re.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", s)))
        text, spans = self._render_one(marked_messages, marked_tools, where)
        return self._encode_marked(text, spans)

    def _encode_marked(self, text: str, spans: list[tuple[int, int]]
                       ) -> tuple[list[int], list[int]]:
        """Cut `text` (marked, as rendered) at the template's own special tokens; tokenize the
        pieces between them as plain text. Offsets come out in the unmarked text's coordinates."""
        markers: list[int] = []  # positions of marker characters in `text`
        pieces: list[tuple[str, bool, int]] = []  # (text, is a template special, clean start)
        buf: list[str] = []
        buf_start = clean = pos = 0
        for m in self._marked_re.finditer(text):
            if m.start() > pos:
                buf.append(text[pos:m.start()])
                clean += m.start() - pos
            if m.group(1) is not None:  # content's special text: plain, markers dropped
                markers += [m.start(), m.end() - 1]
                buf.append(m.group(1))
                clean += len(m.group(1))
            elif m.group(2) is not None:  # the template's token
                if buf:
                    pieces.append(("".join(buf), False, buf_start))
                    buf = []
                pieces.append((m.group(2), True, clean))
                clean += len(m.group(2))
                buf_start = clean
            else:  # a lone marker (the template cut a marked token): dropped
                markers.append(m.start())
            pos = m.end()
        if pos < len(text):
            buf.append(text[pos:])
        if buf:
            pieces.append(("".join(buf), False, buf_start))
        texts = [p for p, special, _ in pieces if not special]
        encoded = iter(self._plain.encode_batch(texts, add_special_tokens=False)) if texts else None
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for piece, special, start in pieces:
            if special:
                ids.append(self._parse.token_to_id(piece))
                offsets.append((start, start + len(piece)))
            else:
                enc = next(encoded)
                ids += enc.ids
                offsets += [(start + a, start + b) for a, b in enc.offsets]
        clean_spans = [(_unmarked(a, markers), _unmarked(b, markers)) for a, b in spans]
        return ids, _mask(offsets, clean_spans)

    def _has_special_text(self, obj: Any) -> bool:
        return any(self._special_re.search(s) for s in _strings(obj))


def _mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span (transformers' rule: spans and offsets
    are both in order, so one pass)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def _unmarked(pos: int, markers: list[int]) -> int:
    """A position in the marked text -> the same place in the text without markers."""
    return pos - bisect.bisect_left(markers, pos)


def _strings(obj: Any):
    """Every string value in the messages (dict keys excluded, as transformers marks them)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


def _map_strings(obj: Any, fn) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_strings(v, fn) for v in obj]
    return obj


def validate_messages(messages: Any, where: str = "messages") -> list[dict]:
    """The conversation as the template gets it (keys whose value is null dropped, as
    transformers does), or a one-line DataError prefixed by `where`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(message, dict):
            raise DataError(f"{at} is a {type(message).__name__}, not an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise DataError(f"{at} has no 'role'")
        if role not in ROLES:
            raise DataError(f"{at} has unknown role {role!r} (expected {', '.join(ROLES)})")
        content = message.get("content")
        calls = message.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise DataError(f"{at} ({role}) has no 'content' (null or absent content is allowed "
                            f"only in an assistant message with tool_calls)")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list) or not all(
                    isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise DataError(f"{at} ({role}): 'content' must be a string or a list of "
                                f"{{'type': 'text', 'text': ...}} parts")
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{at} ({role}) has tool_calls; only assistant messages make calls")
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise DataError(f"{at}: 'tool_calls' must be a list of "
                                f"{{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        out.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    return out


@functools.lru_cache(maxsize=8)
def _cached(directory: str, key: str) -> ChatTokenizer:
    return ChatTokenizer(directory, key)


def load_chat_tokenizer(tokenizer_dir: PathLike, key: str = "tokenizer_dir") -> ChatTokenizer:
    """The directory's ChatTokenizer, loaded once per process (by absolute path); `key` names
    the setting in load errors ("--tokenizer", "data.tokenizer")."""
    return _cached(os.path.abspath(tokenizer_dir), key)


def encode_chat(
    messages: list[dict],
    tokenizer_dir: PathLike,
    *,
    tools: Optional[list[dict]] = None,
    special_tokens_in_content: str = "parse",
) -> tuple[list[int], list[int]]:
    """`(input_ids, loss_mask)` of one conversation: equal to transformers' apply_chat_template
    (with the same `tools`) and `return_assistant_tokens_mask=True` (its `input_ids`,
    `assistant_masks`) in "parse" mode; see the module docstring for "plain"."""
    enc = load_chat_tokenizer(tokenizer_dir).encode(
        messages, special_tokens_in_content=special_tokens_in_content, tools=tools)
    return enc.ids, enc.mask


__all__: Sequence[str] = ("encode_chat", "load_chat_tokenizer", "ChatTokenizer", "EncodedChat",
                          "validate_messages", "ROLES", "SPECIAL_TEXT_MODES")
