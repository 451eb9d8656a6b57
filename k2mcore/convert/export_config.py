"""The non-weight files of an HF export: config.json and its companions.

A checkpoint that came from a release (it carries the release's files, k2mcore.checkpoint.lineage)
gets the release's config.json back with only what changed rewritten, and the release's other
small files (generation config, tokenizer, remote code) verbatim. A model trained from scratch
gets the config transformers writes, with bos/eos/pad from its tokenizer, and the tokenizer's
files when it is a Hugging Face tokenizer.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from k2mcore.checkpoint.lineage import Lineage
from k2mcore.config.schema import K2Config
from k2mcore.errors import ConvertError
from k2mcore.hf.config import fresh_hf_config, updated_hf_config

# a Hugging Face tokenizer directory's files an export takes along (AutoTokenizer loads them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tiktoken.model", "tokenization_kimi.py")


@dataclass
class ExportFiles:
    config: dict
    others: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes, verbatim
    note: str = ""  # for the summary line: where config.json came from


def export_files(step_dir: str, cfg: K2Config, dtype: str, tokenizer: Optional[str] = None) -> ExportFiles:
    """config.json and its companions for the checkpoint in `step_dir`; `dtype` is transformers'
    name of the exported weights' dtype; `tokenizer` overrides data.tokenizer (from scratch)."""
    lineage = Lineage.read(step_dir)
    source = lineage.hf_config()
    if source is not None:
        dropped = bool((lineage.record.get("dropped") or {}).get("mtp_layers"))
        config, changed = updated_hf_config(source, cfg.model, dtype, mtp_dropped=dropped)
        others = {k: v for k, v in lineage.hf_files().items() if k != "config.json"}
        what = f"changed {', '.join(changed)}" if changed else "unchanged"
        return ExportFiles(config, others, f"config.json: the source's, {what}")
    ids, others, note = _tokenizer(tokenizer, cfg)
    return ExportFiles(fresh_hf_config(cfg.model, dtype, bos=ids.get("bos_token_id"),
                                       eos=ids.get("eos_token_id"), pad=ids.get("pad_token_id")),
                       others, note)


def _tokenizer(arg: Optional[str], cfg: K2Config) -> tuple[dict, dict[str, bytes], str]:
    from k2mcore.data.datasets import resolve_path
    from k2mcore.data.tokenizers import load_tokenizer
    from k2mcore.errors import DataError

    name = arg or cfg.data.tokenizer
    key = "--tokenizer" if arg else "data.tokenizer (pass --tokenizer to name another)"
    if not name:
        print("mcore-to-hf: no tokenizer (data.tokenizer is unset; pass --tokenizer): "
              "bos/eos/pad ids left null in config.json", file=sys.stderr, flush=True)
        return {}, {}, "config.json: new, no tokenizer"
    try:
        tok = load_tokenizer(resolve_path(name), key=key)
    except DataError as exc:
        raise ConvertError(str(exc)) from None
    others: dict[str, bytes] = {}
    if tok.directory is not None:
        for fname in TOKENIZER_FILES:
            path = os.path.join(tok.directory, fname)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    others[fname] = f.read()
    elif tok.kind == "hf":
        with open(tok.path, "rb") as f:
            others["tokenizer.json"] = f.read()
    ids = tok.model_token_ids()
    return ids, others, (f"config.json: new, bos/eos/pad {ids['bos_token_id']}/{ids['eos_token_id']}/"
                         f"{ids['pad_token_id']} from {tok.name}")
