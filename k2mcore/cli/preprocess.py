"""`k2m-preprocess`: tokenize jsonl/text into megatron .bin/.idx datasets (k2mcore.data.preprocess);
with `--chat`, conversations into token ids + loss masks (k2mcore.data.chat.preprocess); with
`--rollouts`, RL rollouts (k2mcore.rl.rollouts)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from k2mcore.data.chat.encoding import SPECIAL_TEXT_MODES
from k2mcore.data.chat.preprocess import OVERLONG, preprocess_chat
from k2mcore.data.pipeline import PROG
from k2mcore.data.preprocess import TEXT_MODES, preprocess
from k2mcore.errors import K2Error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Tokenize jsonl/text into megatron .bin/.idx datasets.")
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="jsonl (one JSON object per line) or text files; globs and .gz work")
    g.add_argument("--json-keys", nargs="+", default=None,
                   help="keys to extract from each JSON line (default: text; not with --chat)")
    g.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="auto: .jsonl/.json/.ndjson are jsonl, anything else text")
    g.add_argument("--text-docs", choices=TEXT_MODES, default="paragraph",
                   help="plain text: a document per blank-line-separated paragraph (default), "
                        "per line, or per file")
    g = p.add_argument_group("tokenization")
    g.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a Hugging Face tokenizer.json, a tiktoken BPE file (K2 layout) or a "
                        "Hugging Face tokenizer directory (with --chat: a directory whose "
                        "chat template has {%% generation %%} blocks)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document (not with --chat)")
    g = p.add_argument_group("chat (--chat)")
    g.add_argument("--chat", action="store_true",
                   help='jsonl of {"messages": [...]} conversations rendered by the tokenizer '
                        "directory's chat template; writes <prefix>_input_ids_document and "
                        "<prefix>_loss_mask_document (1 on assistant tokens)")
    g.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="conversations longer than N tokens are truncated or dropped "
                        "(--overlong); default: no limit")
    g.add_argument("--overlong", choices=OVERLONG, default="truncate",
                   help="truncate (default; dropped anyway if no assistant token is left) or "
                        "drop conversations longer than --max-length")
    g.add_argument("--pack-length", type=int, default=None, metavar="N",
                   help="report real tokens against padding with data.packing at "
                        "train.seq_length=N (default: --max-length - 1, the row a conversation "
                        "of --max-length tokens fills; without it, the longest conversation's)")
    g.add_argument("--special-tokens-in-content", choices=SPECIAL_TEXT_MODES, default="parse",
                   help="special-token text in messages: parse into control tokens as "
                        "transformers does (default), or keep it plain text")
    g = p.add_argument_group("rollouts (--rollouts)")
    g.add_argument("--rollouts", action="store_true",
                   help='jsonl of RL rollouts {"prompt": [ids], "response": [ids], "reward": '
                        'r, "group": g, optional "logprobs", "mask", "truncated"} (token ids, '
                        "checked against --tokenizer's vocabulary); writes "
                        "<prefix>_input_ids_document, _loss_mask_document, _rollout_document "
                        "and, with logprobs, _logprobs_document (docs/rl.md)")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.{bin,idx} (megatron's naming); with "
                        "--chat <prefix>_input_ids_document and <prefix>_loss_mask_document")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    g.add_argument("--log-interval", type=int, default=None,
                   help="accepted for megatron compatibility; the progress bar replaces it")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _chat_conflict(args: argparse.Namespace) -> Optional[str]:
    if args.rollouts:
        if args.chat:
            return "--rollouts: not with --chat"
        for flag, value, default in (("--json-keys", args.json_keys, None),
                                     ("--append-eod", args.append_eod, False),
                                     ("--max-length", args.max_length, None),
                                     ("--pack-length", args.pack_length, None),
                                     ("--input-format", args.input_format, "auto")):
            if value != default:
                return f"{flag}: not with --rollouts (rollouts are jsonl of token ids)"
        return None
    if not args.chat:
        for flag, value, default in (("--max-length", args.max_length, None),
                                     ("--pack-length", args.pack_length, None),
                                     ("--overlong", args.overlong, "truncate"),
                                     ("--special-tokens-in-content",
                                      args.special_tokens_in_content, "parse")):
            if value != default:
                return f"{flag} needs --chat"
        return None
    if args.pack_length is not None and args.pack_length < 1:
        return f"--pack-length: {args.pack_length} must be >= 1"
    if args.append_eod:
        return "--append-eod: not with --chat (the chat template ends every turn itself)"
    if args.json_keys is not None:
        return "--json-keys: not with --chat (conversations are read from 'messages')"
    if args.input_format == "text":
        return "--input-format text: not with --chat (conversations are jsonl)"
    return None


def _chat(args: argparse.Namespace) -> None:
    stats = preprocess_chat(
        args.input, args.output_prefix, args.tokenizer, max_length=args.max_length,
        overlong=args.overlong, special_tokens_in_content=args.special_tokens_in_content,
        workers=args.workers, progress=not args.no_progress,
    )
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin/.idx")
    limit = f"--max-length {args.max_length}" if args.max_length else "no --max-length"
    how = "kept as plain text" if args.special_tokens_in_content == "plain" else "parsed"
    print(f"{stats.read} conversations read, {stats.written} written; {stats.truncated} "
          f"truncated, {stats.dropped} dropped ({limit}, --overlong {args.overlong}); "
          f"{stats.with_special_text} with special-token text in content ({how})")
    print(f"{stats.tokens} tokens, {stats.assistant_tokens} assistant tokens in "
          f"{stats.seconds:.2f}s: {stats.conversations_per_s:.0f} conversations/s, "
          f"{stats.tokens_per_s:.0f} tokens/s")
    print(_packing_line(stats.outputs[0], args))


def _rollouts(args: argparse.Namespace) -> None:
    from k2mcore.rl.preprocess import preprocess_rollouts

    stats = preprocess_rollouts(args.input, args.output_prefix, args.tokenizer,
                                workers=args.workers, progress=not args.no_progress)
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin/.idx")
    mean = stats.reward_sum / max(stats.rollouts, 1)
    print(f"{stats.rollouts} rollouts in {stats.groups} groups, {stats.tokens} tokens "
          f"({stats.response_tokens} response), mean reward {mean:.4g}, {stats.truncated} "
          f"truncated, engine logprobs: {'yes' if stats.with_logprobs else 'no'}, in "
          f"{stats.seconds:.2f}s")


def _text(args: argparse.Namespace) -> None:
    stats = preprocess(
        args.input, args.output_prefix, args.tokenizer, json_keys=args.json_keys or ["text"],
        append_eod=args.append_eod, workers=args.workers, input_format=args.input_format,
        text_mode=args.text_docs, progress=not args.no_progress,
    )
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin/.idx")
    print(f"{stats.documents} documents, {stats.tokens} tokens "
          f"({stats.skipped_empty} empty skipped) in {stats.seconds:.2f}s: "
          f"{stats.docs_per_s:.0f} docs/s, {stats.tokens_per_s:.0f} tokens/s")


def _packing_line(ids_prefix: str, args: argparse.Namespace) -> str:
    """Real tokens against padding, packed (data.packing) and one conversation per row."""
    from k2mcore.data.chat.packing import packing_efficiency
    from k2mcore.data.indexed import read_index

    lengths = read_index(ids_prefix).sequence_lengths
    seq_length = args.pack_length or (args.max_length or int(lengths.max())) - 1
    eff = packing_efficiency(lengths, max(seq_length, 1))
    return f"packing at train.seq_length={eff.seq_length}: {eff.describe()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print(f"{PROG}: error: --workers must be >= 1", file=sys.stderr)
        return 2
    conflict = _chat_conflict(args)
    if conflict:
        print(f"{PROG}: error: {conflict}", file=sys.stderr)
        return 2
    try:
        (_rollouts if args.rollouts else _chat if args.chat else _text)(args)
    except K2Error as exc:  # bad input found while reading: one line, nothing left behind
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
