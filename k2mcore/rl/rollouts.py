"""Rollouts: what an inference engine sampled and a verifier scored, on disk and in memory.

One JSON line per rollout (`Rollout.to_json`):

    {"prompt": [ids], "response": [ids], "reward": 1.0, "group": "q17",
     "logprobs": [...], "mask": [1, 1, 0, ...], "truncated": false}

`logprobs[j]` is the engine's log p(response[j] | prompt + response[:j]) at `rl.temperature`;
`mask[j]` is 0 on tokens an environment inserted (tool output), 1 on those the policy generated
(default all 1). `group` (int or string) ties the samples of one prompt: a group is a run of
consecutive lines with the same id (an engine may reuse its ids batch after batch), of two or
more samples.

`k2m-preprocess --rollouts --input r.jsonl --output-prefix P` writes megatron indexed datasets
with one document per rollout, all of the same document count:

    P_input_ids_document   prompt + response ids (megatron's dtype for the vocabulary)
    P_loss_mask_document   uint8: 0 on the prompt, `mask` on the response (the chat pair, so the
                           chat checks apply)
    P_rollout_document     float64 [reward, group, truncated, prompt length] per rollout; group
                           is the run's ordinal in the file
    P_logprobs_document    float32 per token, 0 on the prompt (only when the rollouts carry
                           logprobs: all of them or none)

Training (`data.format: rollouts`) reads them in file order through `RolloutDataset`.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from k2mcore.data import pipeline
from k2mcore.data.chat.preprocess import IDS_SUFFIX, MASK_SUFFIX
from k2mcore.data.indexed import idx_path, read_index, write_meta
from k2mcore.errors import DataError

ROLLOUT_SUFFIX = "_rollout_document"
LOGPROBS_SUFFIX = "_logprobs_document"
# the per-rollout record of ROLLOUT_SUFFIX
REWARD, GROUP, TRUNCATED, PROMPT_LENGTH = range(4)


@dataclass
class Rollout:
    """One sampled response to a prompt, with its reward (see the module docstring)."""

    prompt: list[int]
    response: list[int]
    reward: float
    group: Union[int, str]
    logprobs: Optional[list[float]] = None
    mask: Optional[list[int]] = None
    truncated: bool = False

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"prompt": list(self.prompt), "response": list(self.response),
                               "reward": float(self.reward), "group": self.group}
        if self.logprobs is not None:
            doc["logprobs"] = [float(x) for x in self.logprobs]
        if self.mask is not None:
            doc["mask"] = [int(x) for x in self.mask]
        if self.truncated:
            doc["truncated"] = True
        return doc

    @classmethod
    def from_json(cls, doc: dict, where: str, vocab_size: Optional[int] = None) -> "Rollout":
        """Checked: one DataError line naming `where` (file:line) and the field."""
        for key in ("prompt", "response", "reward", "group"):
            if key not in doc:
                raise DataError(f"{where}: no '{key}' (a rollout line has prompt, response, "
                                f"reward and group)")
        prompt = _ids(doc["prompt"], where, "prompt", vocab_size)
        response = _ids(doc["response"], where, "response", vocab_size)
        reward = doc["reward"]
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) \
                or not math.isfinite(reward):
            raise DataError(f"{where}: reward must be a finite number, got {reward!r}")
        group = doc["group"]
        if isinstance(group, bool) or not isinstance(group, (int, str)):
            raise DataError(f"{where}: group must be an int or a string, got {group!r}")
        n = len(response)
        logprobs = doc.get("logprobs")
        if logprobs is not None:
            if not isinstance(logprobs, list) or len(logprobs) != n:
                raise DataError(f"{where}: logprobs has {_len(logprobs)} values but response has "
                                f"{n} tokens (one log-probability per response token)")
            bad = next((x for x in logprobs if isinstance(x, bool)
                        or not isinstance(x, (int, float)) or not x <= 0 or math.isinf(x)), None)
            if bad is not None or any(isinstance(x, float) and math.isnan(x) for x in logprobs):
                raise DataError(f"{where}: logprobs value {bad!r} is not a finite number <= 0")
        mask = doc.get("mask")
        if mask is not None:
            if not isinstance(mask, list) or len(mask) != n:
                raise DataError(f"{where}: mask has {_len(mask)} values but response has {n} "
                                f"tokens (one 0/1 per response token)")
            if any(x not in (0, 1) or isinstance(x, float) for x in mask):
                raise DataError(f"{where}: mask values must be 0 or 1")
        truncated = doc.get("truncated", False)
        if not isinstance(truncated, bool):
            raise DataError(f"{where}: truncated must be true or false, got {truncated!r}")
        return cls(prompt, response, float(reward), group, logprobs, mask, truncated)


def _len(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else f"no list of ({type(value).__name__})"


def _ids(value: Any, where: str, key: str, vocab_size: Optional[int]) -> list[int]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key} must be a non-empty list of token ids")
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0 or (
                vocab_size is not None and x >= vocab_size):
            limit = f" in [0, {vocab_size})" if vocab_size is not None else " >= 0"
            raise DataError(f"{where}: {key} holds {x!r}, not a token id{limit}")
    return value


def rollout_prefixes(prefix: str) -> dict[str, str]:
    """{ids, mask, rollout, logprobs}: the dataset prefixes of the rollouts `prefix`."""
    for suffix in (IDS_SUFFIX, MASK_SUFFIX, ROLLOUT_SUFFIX, LOGPROBS_SUFFIX):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return {"ids": prefix + IDS_SUFFIX, "mask": prefix + MASK_SUFFIX,
            "rollout": prefix + ROLLOUT_SUFFIX, "logprobs": prefix + LOGPROBS_SUFFIX}


# --- k2m-preprocess --rollouts ----------------------------------------------------------------
@dataclass
class RolloutStats(pipeline.PipelineStats):
    rollouts: int = 0
    groups: int = 0
    response_tokens: int = 0
    with_logprobs: bool = False
    reward_sum: float = 0.0
    truncated: int = 0

    def counts(self) -> dict:
        return {"rollouts": self.rollouts, "groups": self.groups, "tokens": self.tokens,
                "response_tokens": self.response_tokens, "truncated": self.truncated}


_VOCAB = 0
_DTYPE: type = np.int32


def _init_worker(vocab_size: int, dtype: type) -> None:
    global _VOCAB, _DTYPE
    _VOCAB, _DTYPE = vocab_size, dtype


def _encode(item: tuple[str, int, bytes, str]) -> tuple:
    path, lineno, raw, _ = item
    where = f"{path}:{lineno}"
    r = Rollout.from_json(pipeline.json_object(raw, where), where, _VOCAB)
    p = len(r.prompt)
    ids = np.asarray(r.prompt + r.response, dtype=_DTYPE)
    mask = np.zeros(ids.size, dtype=np.uint8)
    mask[p:] = 1 if r.mask is None else np.asarray(r.mask, dtype=np.uint8)
    logp = None
    if r.logprobs is not None:
        logp = np.zeros(ids.size, dtype=np.float32)
        logp[p:] = np.asarray(r.logprobs, dtype=np.float32)
    return where, r.group, r.reward, r.truncated, p, ids, mask, logp, len(raw)


def preprocess_rollouts(inputs: Sequence[str], output_prefix: str, tokenizer: str, *,
                        workers: int = 1, progress: bool = True,
                        chunk_size: int = 256) -> RolloutStats:
    """The rollouts of `inputs` (jsonl, .gz too) -> the datasets of `rollout_prefixes`;
    one DataError line naming the file and line of the first bad record (nothing is left
    behind)."""
    from k2mcore.data.tokenizers import load_tokenizer

    paths = pipeline.expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = pipeline.token_dtype(tok.vocab_size)
    names = rollout_prefixes(output_prefix)
    stats = RolloutStats()
    items = pipeline.read_items(paths, "jsonl", "line")

    def rate(elapsed: float) -> str:
        return f"{stats.rollouts / elapsed:.0f} rollouts/s"

    prefixes = [names["ids"], names["mask"], names["rollout"], names["logprobs"]]
    dtypes = [dtype, np.uint8, np.float64, np.float32]
    # a run of equal ids is a group; its first line, for the one-sample message
    run_id: Any = None
    run_where, run_size, first_logprobs = "", 0, None
    with pipeline.DatasetWriter(prefixes, dtypes) as out, pipeline.encoded(
            paths, items, _init_worker, (tok.vocab_size, dtype), _encode, workers=workers,
            chunk_size=chunk_size, progress=progress, rate=rate) as results:
        for where, group, reward, truncated, p, ids, mask, logp, nbytes in results:
            if first_logprobs is None:
                first_logprobs = logp is not None
            elif first_logprobs != (logp is not None):
                raise DataError(f"{where}: {'has' if logp is not None else 'has no'} logprobs, "
                                f"unlike the first rollout (all rollouts carry them or none)")
            if stats.rollouts == 0 or group != run_id or type(group) is not type(run_id):
                if stats.rollouts and run_size < 2:
                    raise DataError(f"{run_where}: group {run_id!r} has one sample (advantages "
                                    f"need two or more, on consecutive lines)")
                run_id, run_where, run_size = group, where, 0
                stats.groups += 1
            run_size += 1
            out.add(0, ids)
            out.add(1, mask)
            out.add(2, np.asarray([reward, stats.groups - 1, float(truncated), p], np.float64))
            if logp is not None:
                out.add(3, logp)
            stats.rollouts += 1
            stats.tokens += ids.size
            stats.response_tokens += ids.size - p
            stats.reward_sum += reward
            stats.truncated += truncated
            stats.bytes += nbytes
        if stats.rollouts == 0:
            raise DataError(f"--input: no rollout in {', '.join(paths)}")
        if run_size < 2:
            raise DataError(f"{run_where}: group {run_id!r} has one sample (advantages need two "
                            f"or more, on consecutive lines)")
        stats.seconds = results.elapsed()
        stats.with_logprobs = bool(first_logprobs)
        if not stats.with_logprobs:  # no logprobs: no (empty) logprobs dataset either
            out.drop(3)
    stats.outputs = prefixes if stats.with_logprobs else prefixes[:3]
    meta = {"format": "rollouts", "tokenizer": {**tok.describe(), "path": tok.name},
            "documents": stats.rollouts, "logprobs": stats.with_logprobs, **stats.counts(),
            "inputs": [os.path.basename(x) for x in paths]}
    out.commit()
    for p in stats.outputs:
        write_meta(p, meta)
    return stats


# --- training ---------------------------------------------------------------------------------
@dataclass
class RolloutInfo:
    prefix: str
    rollouts: int
    tokens: int
    response_tokens: int
    groups: int
    with_logprobs: bool

    def describe(self) -> str:
        return (f"{os.path.basename(self.prefix)} ({self.rollouts} rollouts in {self.groups} "
                f"groups, {self.response_tokens} response tokens"
                f"{', engine logprobs' if self.with_logprobs else ''})")


def _records(prefix: str) -> np.ndarray:
    """The [rollouts, 4] float64 records of P_rollout_document."""
    names = rollout_prefixes(prefix)
    info = read_index(names["rollout"])
    if np.dtype(info.dtype) != np.float64 or (info.sequence_lengths != 4).any():
        raise DataError(f"data.blend: {idx_path(names['rollout'])} is not a rollout record file "
                        f"(4 float64 values per rollout)")
    return np.fromfile(names["rollout"] + ".bin", dtype=np.float64).reshape(-1, 4)


def check_rollouts(prefix: str, *, seq_length: int, rollout_batch: int, samples: int,
                   **ids_checks: Any) -> RolloutInfo:
    """Every check of a rollouts dataset before training, one line each: the ids and mask as a
    chat pair (k2mcore.data.chat.dataset.check_chat_dataset with `ids_checks`), the records'
    and logprobs' document counts and lengths, no rollout longer than seq_length + 1 tokens,
    at least the rollout batches `samples` (train.iters x global batch) reaches, and no group
    across two of them (`rollout_batch` samples each)."""
    from k2mcore.data.chat.dataset import check_chat_dataset

    names = rollout_prefixes(prefix)
    chat = check_chat_dataset(prefix, **ids_checks)
    n = chat.num_documents
    records = _records(prefix)
    if records.shape[0] != n:
        raise DataError(f"data.blend: {idx_path(names['rollout'])} has {records.shape[0]} "
                        f"rollouts but {idx_path(names['ids'])} has {n} (files from different "
                        f"runs?)")
    with_logprobs = os.path.exists(idx_path(names["logprobs"]))
    if with_logprobs:
        info = read_index(names["logprobs"])
        if not np.array_equal(info.sequence_lengths, chat.ids.sequence_lengths):
            raise DataError(f"data.blend: {idx_path(names['logprobs'])} does not have one value "
                            f"per token of {idx_path(names['ids'])} (files from different runs?)")
    lengths = chat.ids.sequence_lengths
    over = np.flatnonzero(lengths.astype(np.int64) - 1 > seq_length)
    if over.size:
        i = int(over[0])
        raise DataError(f"data.blend: rollout {i} of {prefix} has {int(lengths[i])} tokens, "
                        f"more than train.seq_length+1={seq_length + 1} ({over.size} such); raise "
                        f"train.seq_length")
    batches = -(-samples // rollout_batch)
    if batches * rollout_batch > n:
        raise DataError(f"data.blend: {prefix} holds {n} rollouts, but train.iters needs "
                        f"{batches} rollout batches of train.global_batch_size x rl.minibatches="
                        f"{rollout_batch} ({batches * rollout_batch} rollouts)")
    groups = records[:, GROUP]
    for k in range(1, batches + 1):
        b = k * rollout_batch
        if b < n and groups[b - 1] == groups[b]:
            raise DataError(f"data.blend: a group of {prefix} (rollouts {b - 1} and {b}) straddles "
                            f"rollout batches {k - 1} and {k} of train.global_batch_size x "
                            f"rl.minibatches={rollout_batch} rollouts; a group must lie in one")
    return RolloutInfo(prefix, n, chat.num_tokens, int(lengths.sum() - records[:, PROMPT_LENGTH]
                                                       .sum()), int(groups[-1]) + 1,
                       with_logprobs)


class RolloutDataset:
    """The rollouts `prefix` in file order: `sample(i)` -> {tokens, labels, loss_mask,
    position_ids, rollout_logp} (numpy, length seq_length, rollout_logp label-aligned and only
    with engine logprobs); `rewards`, `groups`, `truncated` per rollout."""

    def __init__(self, prefix: str, seq_length: int, *, pad_id: int) -> None:
        with warnings.catch_warnings():  # megatron's import warns about absent TE/Apex
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset

        from k2mcore.data.chat.dataset import ChatDataset

        names = rollout_prefixes(prefix)
        # the chat layout (tokens = ids[:-1], labels = ids[1:], mask of the label), unshuffled
        self._chat = ChatDataset(prefix, seq_length, pad_id=pad_id, shuffle=False)
        self.seq_length = seq_length
        records = _records(prefix)
        self.rewards = records[:, REWARD].copy()
        self.groups = records[:, GROUP].astype(np.int64)
        self.truncated = records[:, TRUNCATED] > 0
        self._logp = (IndexedDataset(names["logprobs"], mmap=True)
                      if os.path.exists(idx_path(names["logprobs"])) else None)

    @property
    def has_logprobs(self) -> bool:
        return self._logp is not None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def sample(self, index: int) -> dict[str, np.ndarray]:
        row = self._chat[index]
        if self._logp is not None:
            values = self._logp.get(index)
            logp = np.zeros(self.seq_length, dtype=np.float32)
            n = min(values.size - 1, self.seq_length)
            logp[:n] = values[1:n + 1]
            row["rollout_logp"] = logp
        return row


def write_rollouts(path: str, rollouts: Sequence[Rollout]) -> None:
    """`rollouts` as a JSON-lines file (what an engine hands k2m-preprocess --rollouts)."""
    with open(path, "w") as f:
        for r in rollouts:
            f.write(json.dumps(r.to_json()) + "\n")


class RolloutList:
    """Rollouts held in memory (an engine's, or a test's) with `RolloutDataset`'s interface:
    the same rows, records and checks (Rollout.from_json's, and the groups')."""

    def __init__(self, rollouts: Sequence[Rollout], seq_length: int, *, pad_id: int,
                 vocab_size: Optional[int] = None) -> None:
        self.rollouts = [Rollout.from_json(r.to_json(), f"rollout {i}", vocab_size)
                         for i, r in enumerate(rollouts)]
        self.seq_length, self.pad_id = seq_length, int(pad_id)
        with_logp = {r.logprobs is not None for r in self.rollouts}
        if len(with_logp) > 1:
            raise DataError("rollouts: some carry logprobs and some do not (all or none)")
        self.has_logprobs = with_logp == {True}
        ordinals, run = [], 0
        for i, r in enumerate(self.rollouts):
            if i and (r.group != self.rollouts[i - 1].group
                      or type(r.group) is not type(self.rollouts[i - 1].group)):
                run += 1
            ordinals.append(run)
        sizes = np.bincount(ordinals)
        if (sizes < 2).any():
            i = ordinals.index(int(np.flatnonzero(sizes < 2)[0]))
            raise DataError(f"rollout {i}: group {self.rollouts[i].group!r} has one sample "
                            f"(advantages need two or more, consecutive)")
        for i, r in enumerate(self.rollouts):
            if len(r.prompt) + len(r.response) - 1 > seq_length:
                raise DataError(f"rollout {i} has {len(r.prompt) + len(r.response)} tokens, more "
                                f"than train.seq_length+1={seq_length + 1}")
        self.rewards = np.asarray([r.reward for r in self.rollouts], dtype=np.float64)
        self.groups = np.asarray(ordinals, dtype=np.int64)
        self.truncated = np.asarray([r.truncated for r in self.rollouts], dtype=bool)

    def __len__(self) -> int:
        return len(self.rollouts)

    def sample(self, index: int) -> dict[str, np.ndarray]:
        r, s = self.rollouts[index], self.seq_length
        ids = np.asarray(r.prompt + r.response, dtype=np.int64)
        mask = np.zeros(ids.size, dtype=np.float32)
        mask[len(r.prompt):] = 1 if r.mask is None else np.asarray(r.mask, dtype=np.float32)
        n = ids.size - 1
        row = {"tokens": np.full(s, self.pad_id, np.int64),
               "labels": np.full(s, self.pad_id, np.int64),
               "loss_mask": np.zeros(s, np.float32), "position_ids": np.arange(s, dtype=np.int64)}
        row["tokens"][:n], row["labels"][:n], row["loss_mask"][:n] = ids[:-1], ids[1:], mask[1:]
        if r.logprobs is not None:
            logp = np.zeros(ids.size, dtype=np.float32)
            logp[len(r.prompt):] = r.logprobs
            row["rollout_logp"] = np.zeros(s, np.float32)
            row["rollout_logp"][:n] = logp[1:]
        return row
