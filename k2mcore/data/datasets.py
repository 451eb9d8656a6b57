"""Datasets through megatron-core: GPTDataset splits, BlendedDataset blends, the index cache;
chat data (data.format=chat) through k2mcore.data.chat.dataset.ChatDataset with megatron's
split rule.

`check_data(cfg)` runs every check on the configured data (one-line DataError naming the file or
field); `build_datasets(cfg)` then builds megatron's datasets. Both work with and without a
torch.distributed process group; under one, `build_datasets` is collective (megatron builds the
indices on rank 0, the others read them from the cache after a barrier), so every rank must call
it, and `data.cache_dir` must be visible to all ranks.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from k2mcore.config.schema import K2Config
from k2mcore.data.blend import BlendSpec, parse_blend, parse_split
from k2mcore.data.indexed import IndexInfo, check_indexed_dataset
from k2mcore.data.tokenizers import Tokenizer, check_vocab, load_tokenizer
from k2mcore.errors import DataError

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ASSETS_SCHEME = "assets:"  # "assets:sample/x" = <package>/data/assets/sample/x
SPLITS = ("train", "valid", "test")  # megatron's Split order



def cp_pad_multiple(cfg: K2Config) -> int:
    """What packed conversations are padded to: 2·cp with context parallelism (each CP rank
    holds two equal chunks of every document), else 1."""
    return 2 * cfg.parallel.cp if cfg.data.packing and cfg.parallel.cp > 1 else 1

def resolve_path(path: str) -> str:
    """Expand the `assets:` scheme (bundled sample data) and `~`; other paths stay as given."""
    if path.startswith(ASSETS_SCHEME):
        return str(ASSETS_DIR / path[len(ASSETS_SCHEME):])
    return os.path.expanduser(path)


def resolved_blend(cfg: K2Config) -> Optional[BlendSpec]:
    """`data.blend` as megatron's (prefixes, weights) with paths resolved; None: mock data."""
    if cfg.data.blend is None:
        return None
    try:
        prefixes, weights = parse_blend(cfg.data.blend)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return [resolve_path(p) for p in prefixes], weights


def cache_dir(cfg: K2Config) -> str:
    """Megatron's `path_to_cache`: document/sample/shuffle indices, reused run to run."""
    return resolve_path(cfg.data.cache_dir or os.path.join(cfg.run.dir, "data_cache"))


@dataclass(frozen=True)
class DatasetTokenizer:
    """The part of a tokenizer megatron's GPTDataset reads: ids only, so it pickles cheaply into
    loader workers. `unique_identifiers` enters megatron's cache key (a dataset built with another
    tokenizer gets other index files)."""

    vocab_size: int
    eod: int
    unique_identifiers: OrderedDict = field(compare=False, hash=False)

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "DatasetTokenizer":
        ids = OrderedDict(cls=tok.kind, fingerprint=tok.fingerprint(), vocab_size=tok.vocab_size)
        return cls(tok.vocab_size, tok.eod if tok.eod is not None else -1, ids)

    @classmethod
    def mock(cls, vocab_size: int) -> "DatasetTokenizer":
        """For megatron's synthetic data: EOD is the last id, as any id is."""
        return cls(vocab_size, vocab_size - 1, OrderedDict(cls="mock", vocab_size=vocab_size))


@dataclass
class DataSummary:
    """What `check_data` found: enough for a log line and for the loaders."""

    tokenizer: Optional[Tokenizer]
    prefixes: list[str]
    weights: Optional[list[float]]
    infos: list[IndexInfo]

    def describe(self) -> str:
        if not self.prefixes:
            return "data: megatron mock (synthetic) data"
        parts = []
        for i, info in enumerate(self.infos):
            w = f"{self.weights[i]:g} x " if self.weights else ""
            if hasattr(info, "rollouts"):  # k2mcore.rl.rollouts.RolloutInfo
                parts.append(info.describe())
                continue
            if hasattr(info, "mask"):  # a chat dataset (k2mcore.data.chat.dataset.ChatInfo)
                parts.append(f"{w}{os.path.basename(info.ids.prefix)} ({info.num_documents} "
                             f"conversations, {info.num_tokens} tokens, "
                             f"{info.num_loss_tokens} assistant tokens)")
                continue
            parts.append(f"{w}{os.path.basename(info.prefix)} ({info.num_documents} docs, "
                         f"{info.num_tokens} tokens)")
        return "data: " + " + ".join(parts)


def check_data(cfg: K2Config) -> DataSummary:
    """Every data check that needs the files, before any index is built or a step runs.

    Missing/corrupt .bin/.idx, empty documents, token ids >= model.vocab_size, a tokenizer with
    more ids than the model or other than the one the data was made with, a blend that does not
    parse, a split that leaves a dataset's valid/test part without documents.
    """
    blend = resolved_blend(cfg)
    if blend is None:
        return DataSummary(None, [], None, [])
    prefixes, weights = blend
    if not cfg.data.tokenizer:
        raise DataError("data.tokenizer: required when data.blend is set "
                        "(the tokenizer.json or tiktoken file the data was made with)")
    tok = load_tokenizer(resolve_path(cfg.data.tokenizer))
    check_vocab(tok, cfg.model.vocab_size)
    fingerprint = tok.fingerprint()
    try:
        split = parse_split(cfg.data.split)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if cfg.data.format == "chat":
        return _check_chat(cfg, tok, prefixes, weights)
    if cfg.data.format == "rollouts":
        return _check_rollouts(cfg, tok, prefixes, weights)
    infos = []
    for prefix in prefixes:
        info = check_indexed_dataset(
            prefix, vocab_size=cfg.model.vocab_size, cache_dir=cache_dir(cfg),
            tokenizer_fingerprint=fingerprint, tokenizer_path=cfg.data.tokenizer,
        )
        # megatron splits by sequence (= document here) with these bookends
        bounds = [0.0]
        for s in split:
            bounds.append(bounds[-1] + s)
        n = info.sequence_lengths.shape[0]
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            if hi - lo > 0 and int(round(hi * n)) - int(round(lo * n)) < 1:
                raise DataError(
                    f"data.split: {cfg.data.split!r} leaves the {name} split of "
                    f"{info.prefix} ({n} documents) empty; use fewer splits or more data"
                )
        infos.append(info)
    return DataSummary(tok, prefixes, weights, infos)


def _one_padded_prefix(cfg: K2Config, tok: Tokenizer, prefixes: list, what: str,
                       why: str) -> None:
    """Chat and rollout samples: one prefix, and a tokenizer with a padding token."""
    if len(prefixes) != 1:
        raise DataError(f"data.blend: data.format={cfg.data.format} takes one {what} prefix, "
                        f"got {len(prefixes)} ({why})")
    if tok.pad is None:
        raise DataError(f"data.tokenizer: {cfg.data.tokenizer} has no padding token "
                        f"({cfg.data.format} samples are padded to train.seq_length); name one "
                        f"as pad_token in its tokenizer_config.json")


def _check_chat(cfg: K2Config, tok: Tokenizer, prefixes: list, weights) -> DataSummary:
    """data.format=chat: one chat dataset (k2m-preprocess --chat), checked as a pair."""
    from k2mcore.data.chat.dataset import check_chat_dataset

    # megatron's BlendedDataset blends its own dataset classes only; one prefix keeps the
    # sample order megatron-defined (preprocess several jsonl files into one prefix)
    _one_padded_prefix(cfg, tok, prefixes, "chat dataset", "pass several jsonl files to one "
                       "k2m-preprocess --chat")
    info = check_chat_dataset(prefixes[0], vocab_size=cfg.model.vocab_size,
                              cache_dir=cache_dir(cfg), tokenizer_fingerprint=tok.fingerprint(),
                              tokenizer_path=cfg.data.tokenizer, split=cfg.data.split,
                              max_seq_length=None if cfg.data.truncate else cfg.train.seq_length,
                              pad_multiple=cp_pad_multiple(cfg))
    return DataSummary(tok, prefixes, weights, [info])


def _check_rollouts(cfg: K2Config, tok: Tokenizer, prefixes: list, weights) -> DataSummary:
    """data.format=rollouts: one rollouts dataset (k2m-preprocess --rollouts), in file order."""
    from k2mcore.rl.rollouts import check_rollouts

    _one_padded_prefix(cfg, tok, prefixes, "rollouts", "rollouts are used in the engine's "
                       "order")
    t = cfg.train
    info = check_rollouts(prefixes[0], seq_length=t.seq_length,
                          rollout_batch=t.global_batch_size * cfg.rl.minibatches,
                          samples=t.iters * t.global_batch_size, model=cfg.model, rl=cfg.rl,
                          vocab_size=cfg.model.vocab_size, cache_dir=cache_dir(cfg),
                          tokenizer_fingerprint=tok.fingerprint(),
                          tokenizer_path=cfg.data.tokenizer)
    return DataSummary(tok, prefixes, weights, [info])


def dataset_sizes(cfg: K2Config) -> list[int]:
    """Samples to build per split: train = iters x global batch (the sampler's whole range, so a
    resumed run indexes the same shuffled sample list), valid/test = train.eval_iters x global
    batch (what one evaluation reads; every evaluation reads the same ones)."""
    split = parse_split(cfg.data.split) if cfg.data.blend is not None else [1.0, 1.0, 1.0]
    t = cfg.train
    train = t.iters * t.global_batch_size
    # 0, not None, for an absent split: megatron asserts "size None => no weights" for blends
    return [train] + [t.eval_iters * t.global_batch_size if s > 0 else 0 for s in split[1:]]


def gpt_dataset_config(cfg: K2Config, summary: DataSummary):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    if summary.tokenizer is None:
        tok = DatasetTokenizer.mock(cfg.model.vocab_size)
        blend, split = None, None
    else:
        tok = DatasetTokenizer.from_tokenizer(summary.tokenizer)
        blend, split = (summary.prefixes, summary.weights), cfg.data.split
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir(cfg),
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,  # the model builds the causal mask itself
        num_dataset_builder_threads=1,
    )


def build_datasets(cfg: K2Config, summary: Optional[DataSummary] = None) -> dict:
    """{"train"|"valid"|"test": megatron dataset or None}; collective under a process group."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    summary = summary if summary is not None else check_data(cfg)
    if cfg.data.format == "chat":
        from k2mcore.data.chat.dataset import build_chat_datasets

        t = cfg.train
        return build_chat_datasets(summary.prefixes[0], t.seq_length, cfg.data.split, t.seed,
                                   dataset_sizes(cfg), pad_id=summary.tokenizer.pad,
                                   packing=cfg.data.packing, truncate=cfg.data.truncate,
                                   pad_multiple=cp_pad_multiple(cfg))
    config = gpt_dataset_config(cfg, summary)
    cls = GPTDataset if summary.tokenizer is not None else MockGPTDataset
    if summary.tokenizer is None:
        log.warning("data.blend is null: training on megatron's synthetic (mock) data")
    builder = BlendedMegatronDatasetBuilder(cls, dataset_sizes(cfg), lambda: True, config)
    return dict(zip(SPLITS, builder.build()))
