"""Tokenizers: a Hugging Face `tokenizer.json` or a tiktoken BPE file laid out as Kimi-K2's.

Either may also be named by its Hugging Face tokenizer directory (the kind `AutoTokenizer` loads,
which is what the chat path needs for its template): the directory's `tokenizer.json`, or its
`tiktoken.model`, gives the same ids and fingerprint as the file alone; its
`tokenizer_config.json` names the padding token and, when no EOD candidate is in the vocabulary,
the end-of-document token (`eos_token`).

Kimi-K2 ships `tiktoken.model` (one "base64(token bytes) rank" line per token), splits text with
the regex of its `tokenization_kimi.py` (`K2_PAT_STR`), and places 256 reserved special tokens
right after the BPE ranks, named by `tokenizer_config.json` when one sits next to the file and
by K2's published layout (`K2_SPECIAL_TOKENS`) otherwise.

Text is always encoded as plain text: a corpus that contains "<|im_end|>" gets the characters,
never the control token (both backends behave the same way here).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from k2mcore.errors import DataError

PathLike = Union[str, os.PathLike]

# tokenization_kimi.py's `pat_str`: Han runs, cased words with English contractions, 1-3 digit
# groups, punctuation runs, newlines, whitespace. `&&` is a character-class intersection, which
# both tiktoken's fancy-regex and the tokenizers library's Oniguruma understand.
K2_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
K2_NUM_RESERVED_SPECIAL_TOKENS = 256
# Offsets from the BPE vocabulary size (163584 in K2) -> name, as in K2's tokenizer_config.json;
# the other reserved slots are "<|reserved_token_{id}|>".
K2_SPECIAL_TOKENS: dict[int, str] = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
    17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}
# The document separator appended by `--append-eod`: the first of these the vocabulary has.
EOD_CANDIDATES = ("<|endoftext|>", "[EOS]", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
# The padding token (chat samples are padded to the sequence length): the first one present.
PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>")
# The beginning-of-sequence token a model config names (bos_token_id): the first one present.
BOS_CANDIDATES = ("[BOS]", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "<|bos|>")
HF_CONFIG = "tokenizer_config.json"

# Encoded to fingerprint a tokenizer: two files that give the same ids here (and the same vocab
# size and EOD) are taken to be the same tokenizer, whatever their format.
_PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 1234567 o'clock; we'll see.\n"
    "    def f(x):\n        return {'a': [x, 3.14]}  # comment\n\n"
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. "
    "敏捷的棕色狐狸跳过了懒狗。 Съешь же ещё этих мягких французских булок. ∑ 🚀 \t\r\n"
)


def k2_special_tokens(
    num_base_tokens: int, names: Optional[dict[int, str]] = None
) -> dict[str, int]:
    """The 256 reserved special tokens after `num_base_tokens` BPE ranks, K2's layout.

    `names` maps absolute ids to names (a tokenizer_config.json's `added_tokens_decoder`);
    by default K2's published names at their offsets.
    """
    if names is None:
        names = {num_base_tokens + off: name for off, name in K2_SPECIAL_TOKENS.items()}
    out = {}
    for i in range(num_base_tokens, num_base_tokens + K2_NUM_RESERVED_SPECIAL_TOKENS):
        out[names.get(i, f"<|reserved_token_{i}|>")] = i
    for i, name in names.items():  # named ids beyond the reserved block, if any
        out.setdefault(name, i)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer(ABC):
    """What preprocessing and the data checks need from a tokenizer."""

    kind: str
    path: Path
    vocab_size: int  # every id is < vocab_size (specials included)
    eod: Optional[int]  # None: the vocabulary has none of EOD_CANDIDATES
    pad: Optional[int]  # the config's pad_token, else the first of PAD_CANDIDATES; None: neither
    special_tokens: dict[str, int]
    directory: Optional[Path] = None  # the Hugging Face directory it was loaded from, if any

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids, special-token names encoded as plain text."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text (special tokens rendered by name)."""

    @property
    def sha256(self) -> str:
        return _sha256(self.path)

    def fingerprint(self) -> str:
        """Format-independent identity: hash of (vocab size, EOD, ids of a probe text)."""
        payload = json.dumps([self.vocab_size, self.eod, self.encode(_PROBE_TEXT)])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """How data sidecars name it: the file, or `<directory>/<file>`."""
        if self.directory is not None:
            return f"{self.directory.name}/{self.path.name}"
        return self.path.name

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "vocab_size": self.vocab_size,
                "eod": self.eod, "fingerprint": self.fingerprint()}

    def model_token_ids(self) -> dict[str, Optional[int]]:
        """bos/eos/pad ids as a transformers model config names them: the directory config's
        bos_token/eos_token where it names them, else the first candidate present (eos: the
        EOD); None where the vocabulary has none."""
        bos = self._configured_id("bos_token")
        if bos is None:
            bos = next((self.special_tokens[n] for n in BOS_CANDIDATES if n in self.special_tokens), None)
        eos = self._configured_id("eos_token")
        return {"bos_token_id": bos, "eos_token_id": self.eod if eos is None else eos,
                "pad_token_id": self.pad}

    def _pick_eod(self) -> Optional[int]:
        for name in EOD_CANDIDATES:
            if name in self.special_tokens:
                return self.special_tokens[name]
        return self._configured_id("eos_token")

    def _pick_pad(self) -> Optional[int]:
        configured = self._configured_id("pad_token")
        if configured is not None:
            return configured
        for name in PAD_CANDIDATES:
            if name in self.special_tokens:
                return self.special_tokens[name]
        return None

    def _configured_id(self, attr: str) -> Optional[int]:
        """The id of the directory config's `attr` (e.g. "pad_token"), if it names a token."""
        if self.directory is None:
            return None
        value = read_hf_config(self.directory).get(attr)
        if isinstance(value, dict):  # an AddedToken as transformers saves it
            value = value.get("content")
        return self.special_tokens.get(value) if isinstance(value, str) else None


def read_hf_config(directory: PathLike) -> dict:
    """A tokenizer directory's tokenizer_config.json ({} when absent); a one-line DataError on
    junk."""
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json."""

    kind = "hf"

    def __init__(self, path: PathLike, directory: Optional[PathLike] = None) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        self.directory = Path(directory) if directory is not None else None
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as exc:  # the Rust error is multi-line and does not name the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{self.path}: not a valid tokenizer.json ({first})") from None
        # added/special tokens inside the text stay text (tokenizers >= 0.15)
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special_tokens = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
        }
        self.eod = self._pick_eod()
        self.pad = self._pick_pad()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __getstate__(self) -> dict:  # re-read in worker processes
        return {"path": self.path, "directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state.get("directory"))


def read_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: "base64(bytes) rank" per line; one-line DataError on junk."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except ValueError:
                shown = line[:60].decode("utf-8", "replace").strip()
                raise DataError(
                    f"{path}:{lineno}: not a tiktoken BPE line ('base64token rank'): {shown!r} "
                    f"(tokenizers must be a tokenizer.json or a tiktoken BPE file)"
                ) from None
            ranks[token] = rank
    if not ranks:
        raise DataError(f"{path}: empty tiktoken BPE file")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file with K2's split regex and reserved special tokens."""

    kind = "tiktoken"

    def __init__(self, path: PathLike, pat_str: str = K2_PAT_STR,
                 directory: Optional[PathLike] = None) -> None:
        import tiktoken

        self.path = Path(path)
        self.directory = Path(directory) if directory is not None else None
        ranks = read_tiktoken_ranks(self.path)
        num_base = max(ranks.values()) + 1
        self.special_tokens = k2_special_tokens(num_base, self._configured_names())
        self._enc = tiktoken.Encoding(
            name=self.path.stem, pat_str=pat_str, mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._pat_str = pat_str
        self.vocab_size = max(num_base, max(self.special_tokens.values()) + 1)
        self.eod = self._pick_eod()
        self.pad = self._pick_pad()

    def _configured_names(self) -> Optional[dict[int, str]]:
        """`added_tokens_decoder` of a tokenizer_config.json beside the file (K2's HF layout)."""
        config = self.path.parent / "tokenizer_config.json"
        if not config.is_file():
            return None
        try:
            decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
            return {int(i): entry["content"] for i, entry in decoder.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{config}: unreadable added_tokens_decoder ({exc})") from None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def __getstate__(self) -> dict:
        return {"path": self.path, "pat_str": self._pat_str, "directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["pat_str"], state.get("directory"))


def load_tokenizer(path: PathLike, key: str = "data.tokenizer") -> Tokenizer:
    """tokenizer.json (by suffix), a tiktoken BPE file, or a Hugging Face tokenizer directory
    holding either (`tokenizer.json` first, else `tiktoken.model`); DataError naming `key`."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json", directory=path)
        if (path / "tiktoken.model").is_file():
            return TiktokenTokenizer(path / "tiktoken.model", directory=path)
        raise DataError(f"{key}: tokenizer directory {path} has no tokenizer.json "
                        f"(nor tiktoken.model)")
    if not path.is_file():
        raise DataError(f"{key}: tokenizer file {path} not found")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return TiktokenTokenizer(path)


# --- building a K2-style tokenizer (bundled sample assets, tests) -------------------------------
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (char -> byte), the one `tokenizers`' ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def train_k2_bpe(
    texts: Iterable[str], vocab_size: int, out_dir: PathLike, name: str = "tokenizer"
) -> tuple[Path, Path]:
    """Train a byte-level BPE with K2's split regex; write it twice, with identical encodings.

    `vocab_size` counts the 256 reserved special tokens, K2's layout: BPE ranks
    [0, vocab_size - 256), specials after. Returns (`<name>.tokenizer.json`, `<name>.tiktoken`).
    The HF model sets `ignore_merges` so that, like tiktoken, a pre-token that is itself in the
    vocabulary is emitted whole; merge i creates rank 256 + i in both files.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as _HF

    num_base = vocab_size - K2_NUM_RESERVED_SPECIAL_TOKENS
    if num_base <= 256:
        raise ValueError(f"vocab_size={vocab_size}: need > 256 byte tokens + 256 specials")
    tok = _HF(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    if len(vocab) != num_base:  # a corpus too small to learn every merge
        raise ValueError(f"trained {len(vocab)} BPE tokens, wanted {num_base}: corpus too small")
    specials = k2_special_tokens(num_base)
    tok.add_special_tokens(sorted(specials, key=specials.get))  # ids num_base.. in order

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, tiktoken_path = out / f"{name}.tokenizer.json", out / f"{name}.tiktoken"
    tok.save(str(json_path))
    to_byte = _byte_level_decoder()
    ranks = sorted((i, bytes(to_byte[c] for c in s)) for s, i in vocab.items())
    tiktoken_path.write_text(
        "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in ranks)
    )
    return json_path, tiktoken_path


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, key: str = "data.tokenizer") -> None:
    """A tokenizer whose ids reach past the embedding table cannot train this model."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"{key}: {tokenizer.path} has {tokenizer.vocab_size} token ids but "
            f"model.vocab_size={model_vocab_size} (tokenizer/vocab mismatch)"
        )


__all__: Sequence[str] = (
    "K2_PAT_STR", "K2_SPECIAL_TOKENS", "EOD_CANDIDATES", "PAD_CANDIDATES", "Tokenizer",
    "HFTokenizer", "TiktokenTokenizer", "load_tokenizer", "train_k2_bpe", "k2_special_tokens",
    "check_vocab", "read_tiktoken_ranks", "read_hf_config",
)
