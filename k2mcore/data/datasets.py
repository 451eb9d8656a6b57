"""Datasets through megatron-core: GPTDataset splits, BlendedDataset blends, the index cache.

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
from k2mcore.data.errors import DataError
from k2mcore.data.indexed import IndexInfo, check_indexed_dataset
from k2mcore.data.tokenizers import Tokenizer, check_vocab, load_tokenizer

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ASSETS_SCHEME = "assets:"  # "assets:sample/x" = <package>/data/assets/sample/x
SPLITS = ("train", "valid", "test")  # megatron's Split order


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


def dataset_sizes(cfg: K2Config) -> list[int]:
    """Samples to build per split: train = iters x global batch (the sampler's whole range, so a
    resumed run indexes the same shuffled sample list), valid/test = data.eval_samples."""
    split = parse_split(cfg.data.split) if cfg.data.blend is not None else [1.0, 1.0, 1.0]
    train = cfg.train.iters * cfg.train.global_batch_size
    # 0, not None, for an absent split: megatron asserts "size None => no weights" for blends
    return [train] + [cfg.data.eval_samples if s > 0 else 0 for s in split[1:]]


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
    config = gpt_dataset_config(cfg, summary)
    cls = GPTDataset if summary.tokenizer is not None else MockGPTDataset
    if summary.tokenizer is None:
        log.warning("data.blend is null: training on megatron's synthetic (mock) data")
    builder = BlendedMegatronDatasetBuilder(cls, dataset_sizes(cfg), lambda: True, config)
    return dict(zip(SPLITS, builder.build()))
