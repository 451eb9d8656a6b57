"""k2m-convert: Hugging Face <-> k2mcore checkpoints, and what a checkpoint holds.

    k2m-convert hf-to-mcore --hf-dir D --out C [--dtype auto|bf16|fp32] [--drop-mtp] [--force]
    k2m-convert mcore-to-hf --ckpt C --out D [--dtype bf16|fp32] [--tokenizer T] [--force]
    k2m-convert inspect PATH

Bad input is one line on stderr, exit status 2; nothing is left at --out unless it completed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

PROG = "k2m-convert"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF kimi_k2/deepseek_v3 directory -> k2mcore checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="stored dtype (auto: the HF config's; bf16 for block-FP8 releases)")
    a.add_argument("--force", action="store_true", help="replace an existing --out")
    a.add_argument("--drop-mtp", action="store_true",
                   help="convert a release with multi-token-prediction layers without them "
                        "(recorded in the checkpoint; the export's config then has none)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("mcore-to-hf", help="k2mcore checkpoint (any layout) -> HF directory")
    b.add_argument("--ckpt", required=True, help="a step directory or a checkpoint root (newest step)")
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    b.add_argument("--shard-size-gb", type=float, default=4.0)
    b.add_argument("--tokenizer", help="a model trained from scratch: the tokenizer whose bos/eos/"
                   "pad ids config.json gets (default: the checkpoint's data.tokenizer)")
    b.add_argument("--force", action="store_true", help="replace an existing --out")
    b.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("inspect", help="print what a checkpoint holds")
    c.add_argument("path")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2
    from k2mcore.errors import K2Error

    try:
        if args.command == "hf-to-mcore":
            from k2mcore.convert.hf_to_mcore import convert_hf_to_mcore

            convert_hf_to_mcore(args.hf_dir, args.out, dtype=args.dtype, force=args.force,
                                progress=not args.no_progress, drop_mtp=args.drop_mtp)
        elif args.command == "mcore-to-hf":
            from k2mcore.convert.mcore_to_hf import convert_mcore_to_hf

            convert_mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, force=args.force,
                                progress=not args.no_progress,
                                shard_bytes=int(args.shard_size_gb * 2**30), tokenizer=args.tokenizer)
        else:
            from k2mcore.convert.inspect import describe

            print(describe(args.path))
    except K2Error as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
