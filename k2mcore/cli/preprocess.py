"""`k2m-preprocess`: tokenize jsonl/text into megatron .bin/.idx datasets (k2mcore.data.preprocess)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from k2mcore.data.errors import DataError
from k2mcore.data.preprocess import TEXT_MODES, PROG, preprocess


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Tokenize jsonl/text into megatron .bin/.idx datasets.")
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="jsonl (one JSON object per line) or text files; globs and .gz work")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract from each JSON line (default: text)")
    g.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="auto: .jsonl/.json/.ndjson are jsonl, anything else text")
    g.add_argument("--text-docs", choices=TEXT_MODES, default="paragraph",
                   help="plain text: a document per blank-line-separated paragraph (default), "
                        "per line, or per file")
    g = p.add_argument_group("tokenization")
    g.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a Hugging Face tokenizer.json or a tiktoken BPE file (K2 layout)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.{bin,idx} (megatron's naming)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    g.add_argument("--log-interval", type=int, default=None,
                   help="accepted for megatron compatibility; the progress bar replaces it")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print(f"{PROG}: error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        stats = preprocess(
            args.input, args.output_prefix, args.tokenizer, json_keys=args.json_keys,
            append_eod=args.append_eod, workers=args.workers, input_format=args.input_format,
            text_mode=args.text_docs, progress=not args.no_progress,
        )
    except DataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin/.idx")
    print(f"{stats.documents} documents, {stats.tokens} tokens "
          f"({stats.skipped_empty} empty skipped) in {stats.seconds:.2f}s: "
          f"{stats.docs_per_s:.0f} docs/s, {stats.tokens_per_s:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
