"""Megatron-style preprocessing entry point: a thin wrapper over `k2m-preprocess`.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer tokenizer.json --append-eod --workers 8

writes data/corpus_text_document.{bin,idx}. The implementation is k2mcore.cli.preprocess (so the
installed console script `k2m-preprocess` is the same program).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k2mcore.cli.preprocess import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
