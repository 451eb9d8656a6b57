"""Rollouts: what an inference engine sampled and a verifier scored, on disk and in memory.

One JSON line per rollout (`Rollout.to_json`):

    {"prompt": [ids], "response": [ids], "reward": 1.0, "group": "q17",
     "logprobs": [...], "mask": [1, 1, 0, ...], "truncated": false}

`logprobs[j]` is the engine's log p(response[j] | prompt + response[:j]) at `rl.temperature`;
`mask[j]` is 0 on tokens an environment inserted (tool output), 1 on those the policy generated
(default all 1). `group` (int or string) ties the samples of one prompt: a group is a run of
consecutive lines with the same id (an engine may reuse its ids batch after batch), of two or
more samples.

`k2m-preprocess --rollouts --input r.jsonl --output-prefix P` (k2mcore.rl.preprocess) writes
megatron indexed datasets with one document per rollout, all of the same document count:

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

from k2mcore.data.chat.preprocess import IDS_SUFFIX, MASK_SUFFIX
from k2mcore.data.indexed import idx_path, read_index
from k2mcore.errors import DataError

ROLLOUT_SUFFIX = "_rollout_document"
LOGPROBS_SUFFIX = "_logprobs_document"
ROUTES_SUFFIX = "_routes_document"
REF_SUFFIX = "_ref_logprobs_document"
# the optional datasets: every rollout carries the field or none does
OPTIONAL = ("logprobs", "routes", "ref_logprobs")
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
    # routes[t][i]: the top-k expert ids the engine used at input position t of
    # prompt + response[:-1] in the i-th MoE layer (R3 routing replay)
    routes: Optional[list[list[list[int]]]] = None
    ref_logprobs: Optional[list[float]] = None  # the reference policy's, as logprobs

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"prompt": list(self.prompt), "response": list(self.response),
                               "reward": float(self.reward), "group": self.group}
        if self.logprobs is not None:
            doc["logprobs"] = [float(x) for x in self.logprobs]
        if self.mask is not None:
            doc["mask"] = [int(x) for x in self.mask]
        if self.truncated:
            doc["truncated"] = True
        if self.routes is not None:
            doc["routes"] = [[[int(e) for e in ids] for ids in pos] for pos in self.routes]
        if self.ref_logprobs is not None:
            doc["ref_logprobs"] = [float(x) for x in self.ref_logprobs]
        return doc

    @classmethod
    def from_json(cls, doc: dict, where: str, vocab_size: Optional[int] = None,
                  num_experts: Optional[int] = None) -> "Rollout":
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
        logprobs = _logprobs(doc.get("logprobs"), n, where, "logprobs")
        ref_logprobs = _logprobs(doc.get("ref_logprobs"), n, where, "ref_logprobs")
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
        routes = doc.get("routes")
        if routes is not None:
            _check_routes(routes, len(prompt) + n - 1, where, num_experts)
        return cls(prompt, response, float(reward), group, logprobs, mask, truncated, routes,
                   ref_logprobs)


def _logprobs(values: Any, n: int, where: str, key: str) -> Optional[list[float]]:
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != n:
        raise DataError(f"{where}: {key} has {_len(values)} values but response has {n} tokens "
                        f"(one log-probability per response token)")
    bad = next((x for x in values if isinstance(x, bool) or not isinstance(x, (int, float))
                or not x <= 0 or math.isinf(x)), None)
    if bad is not None or any(isinstance(x, float) and math.isnan(x) for x in values):
        raise DataError(f"{where}: {key} value {bad!r} is not a finite number <= 0")
    return values


def _check_routes(routes: Any, positions: int, where: str, num_experts: Optional[int]) -> None:
    """routes: one entry per input position, each a list (MoE layers) of k distinct ids."""
    if not isinstance(routes, list) or len(routes) != positions:
        raise DataError(f"{where}: routes has {_len(routes)} positions but prompt + response[:-1] "
                        f"has {positions} (one entry per input position)")
    layers = topk = None
    for t, pos in enumerate(routes):
        if not isinstance(pos, list) or not pos or (layers is not None and len(pos) != layers):
            raise DataError(f"{where}: routes[{t}] has {_len(pos)} MoE layers, routes[0] "
                            f"{layers}")
        layers = len(pos)
        for i, ids in enumerate(pos):
            ok = isinstance(ids, list) and ids and all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids)
            if not ok or len(set(ids)) != len(ids) or (topk is not None and len(ids) != topk):
                raise DataError(f"{where}: routes[{t}][{i}] is not a set of {topk or 'k'} "
                                f"distinct expert ids >= 0: {ids!r}")
            topk = len(ids)
            if num_experts is not None and max(ids) >= num_experts:
                raise DataError(f"{where}: routes[{t}][{i}] holds expert {max(ids)} >= "
                                f"model.num_experts={num_experts}")


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
    """{ids, mask, rollout, logprobs, routes, ref_logprobs}: the dataset prefixes of the
    rollouts `prefix`."""
    suffixes = (IDS_SUFFIX, MASK_SUFFIX, ROLLOUT_SUFFIX, LOGPROBS_SUFFIX, ROUTES_SUFFIX,
                REF_SUFFIX)
    for suffix in sorted(suffixes, key=len, reverse=True):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
            break
    return {"ids": prefix + IDS_SUFFIX, "mask": prefix + MASK_SUFFIX,
            "rollout": prefix + ROLLOUT_SUFFIX, "logprobs": prefix + LOGPROBS_SUFFIX,
            "routes": prefix + ROUTES_SUFFIX, "ref_logprobs": prefix + REF_SUFFIX}


def _per_token(values: Optional[list], p: int, size: int) -> Optional[np.ndarray]:
    """A response field as a float32 value per token of prompt + response (0 on the prompt)."""
    if values is None:
        return None
    out = np.zeros(size, dtype=np.float32)
    out[p:] = np.asarray(values, dtype=np.float32)
    return out


# --- training ---------------------------------------------------------------------------------
@dataclass
class RolloutInfo:
    prefix: str
    rollouts: int
    tokens: int
    response_tokens: int
    groups: int
    with_logprobs: bool
    with_routes: bool = False
    with_ref: bool = False

    def describe(self) -> str:
        extra = [name for name, has in (("engine logprobs", self.with_logprobs),
                                        ("routes", self.with_routes),
                                        ("reference logprobs", self.with_ref)) if has]
        return (f"{os.path.basename(self.prefix)} ({self.rollouts} rollouts in {self.groups} "
                f"groups, {self.response_tokens} response tokens"
                f"{''.join(', ' + e for e in extra)})")


def _records(prefix: str) -> np.ndarray:
    """The [rollouts, 4] float64 records of P_rollout_document."""
    names = rollout_prefixes(prefix)
    info = read_index(names["rollout"])
    if np.dtype(info.dtype) != np.float64 or (info.sequence_lengths != 4).any():
        raise DataError(f"data.blend: {idx_path(names['rollout'])} is not a rollout record file "
                        f"(4 float64 values per rollout)")
    return np.fromfile(names["rollout"] + ".bin", dtype=np.float64).reshape(-1, 4)


def route_shape(prefix: str) -> Optional[tuple[int, int]]:
    """(MoE layers, k) of the rollouts' routes (their sidecar), or None without routes."""
    from k2mcore.data.indexed import read_meta

    name = rollout_prefixes(prefix)["routes"]
    if not os.path.exists(idx_path(name)):
        return None
    meta = read_meta(name) or {}
    if "moe_layers" not in meta or "topk" not in meta:
        raise DataError(f"data.blend: {name}.json does not say the routes' MoE layers and top-k "
                        f"(re-run k2m-preprocess --rollouts)")
    return int(meta["moe_layers"]), int(meta["topk"])


def check_rollouts(prefix: str, *, seq_length: int, rollout_batch: int, samples: int,
                   model: Any = None, rl: Any = None, **ids_checks: Any) -> RolloutInfo:
    """Every check of a rollouts dataset before training, one line each: the ids and mask as a
    chat pair (k2mcore.data.chat.dataset.check_chat_dataset with `ids_checks`), the records'
    and per-token files' document counts and lengths, no rollout longer than seq_length + 1
    tokens, at least the rollout batches `samples` (train.iters x global batch) reaches, and
    no group across two of them (`rollout_batch` samples each). With `model` (ModelConfig) and
    `rl` (RLConfig): routes for the model's MoE layers, top-k and experts, and the fields the
    rl section needs (routes for routing_replay=rollout, reference logprobs for kl_coef without
    rl.reference)."""
    from k2mcore.data.chat.dataset import check_chat_dataset
    from k2mcore.data.indexed import token_range

    names = rollout_prefixes(prefix)
    chat = check_chat_dataset(prefix, **ids_checks)
    n = chat.num_documents
    records = _records(prefix)
    if records.shape[0] != n:
        raise DataError(f"data.blend: {idx_path(names['rollout'])} has {records.shape[0]} "
                        f"rollouts but {idx_path(names['ids'])} has {n} (files from different "
                        f"runs?)")
    lengths = chat.ids.sequence_lengths
    has = {k: os.path.exists(idx_path(names[k])) for k in OPTIONAL}
    for key in ("logprobs", "ref_logprobs"):
        if has[key] and not np.array_equal(read_index(names[key]).sequence_lengths, lengths):
            raise DataError(f"data.blend: {idx_path(names[key])} does not have one value per "
                            f"token of {idx_path(names['ids'])} (files from different runs?)")
    shape = route_shape(prefix)
    if shape is not None:
        per = read_index(names["routes"]).sequence_lengths.astype(np.int64)
        if not np.array_equal(per, (lengths.astype(np.int64) - 1) * shape[0] * shape[1]):
            raise DataError(f"data.blend: {idx_path(names['routes'])} does not have routes for "
                            f"each input position of {idx_path(names['ids'])}")
        if model is not None:
            layers = model.num_layers - model.first_k_dense
            if shape[0] != layers:
                raise DataError(f"data.blend: {prefix}'s routes are for {shape[0]} MoE layers, "
                                f"but the model has {layers} (model.num_layers - "
                                f"model.first_k_dense)")
            if shape[1] != model.moe_topk:
                raise DataError(f"data.blend: {prefix}'s routes hold {shape[1]} experts per "
                                f"token, but model.moe_topk={model.moe_topk}")
            top = token_range(names["routes"], np.int32, ids_checks.get("cache_dir"))[1]
            if top >= model.num_experts:
                raise DataError(f"data.blend: {names['routes']}.bin holds expert id {top} >= "
                                f"model.num_experts={model.num_experts}")
    if rl is not None:
        if rl.routing_replay == "rollout" and shape is None:
            raise DataError(f"rl.routing_replay: rollout replays the engine's experts, but the "
                            f"rollouts {prefix} carry no routes")
        if rl.kl_coef > 0 and rl.reference is None and not has["ref_logprobs"]:
            raise DataError(f"rl.kl_coef: {rl.kl_coef} needs the reference policy: set "
                            f"rl.reference, or give the rollouts {prefix} ref_logprobs")
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
                       has["logprobs"], shape is not None, has["ref_logprobs"])


def _label_aligned(values: np.ndarray, seq_length: int) -> np.ndarray:
    """A per-token value of ids as the label's: position j holds ids[j + 1]'s."""
    out = np.zeros(seq_length, dtype=np.float32)
    n = min(values.size - 1, seq_length)
    out[:n] = values[1:n + 1]
    return out


def _route_rows(flat: np.ndarray, shape: tuple[int, int], seq_length: int) -> np.ndarray:
    """Routes [seq_length, layers, k] int64 of an input row; -1 where there is none (padding)."""
    out = np.full((seq_length, *shape), -1, dtype=np.int64)
    given = flat.reshape(-1, *shape)[:seq_length]
    out[:given.shape[0]] = given
    return out


class RolloutDataset:
    """The rollouts `prefix` in file order: `sample(i)` -> {tokens, labels, loss_mask,
    position_ids} and, when the rollouts carry them, rollout_logp and ref_logp (label-aligned)
    and routes [seq_length, MoE layers, k] (numpy, length seq_length); `rewards`, `groups`,
    `truncated` per rollout."""

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
        self._opt = {k: IndexedDataset(names[k], mmap=True) for k in OPTIONAL
                     if os.path.exists(idx_path(names[k]))}
        self.route_shape = route_shape(prefix)

    @property
    def has_logprobs(self) -> bool:
        return "logprobs" in self._opt

    @property
    def has_routes(self) -> bool:
        return "routes" in self._opt

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def sample(self, index: int) -> dict[str, np.ndarray]:
        row = self._chat[index]
        if "logprobs" in self._opt:
            row["rollout_logp"] = _label_aligned(self._opt["logprobs"].get(index),
                                                 self.seq_length)
        if "ref_logprobs" in self._opt:
            row["ref_logp"] = _label_aligned(self._opt["ref_logprobs"].get(index),
                                             self.seq_length)
        if "routes" in self._opt:
            row["routes"] = _route_rows(self._opt["routes"].get(index), self.route_shape,
                                        self.seq_length)
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
                 vocab_size: Optional[int] = None, num_experts: Optional[int] = None) -> None:
        self.rollouts = [Rollout.from_json(r.to_json(), f"rollout {i}", vocab_size, num_experts)
                         for i, r in enumerate(rollouts)]
        self.seq_length, self.pad_id = seq_length, int(pad_id)
        for key in OPTIONAL:
            if len({getattr(r, key) is not None for r in self.rollouts}) > 1:
                raise DataError(f"rollouts: some carry {key} and some do not (all or none)")
        first = self.rollouts[0] if self.rollouts else None
        self.has_logprobs = first is not None and first.logprobs is not None
        self.has_routes = first is not None and first.routes is not None
        self.route_shape = (np.asarray(first.routes).shape[1:] if self.has_routes else None)
        ordinals, run = [], 0
        for i, r in enumerate(self.rollouts):
            if i and (r.group != self.rollouts[i - 1].group
                      or type(r.group) is not type(self.rollouts[i - 1].group)):
                run += 1
            ordinals.append(run)
            if self.has_routes and np.asarray(r.routes).shape[1:] != self.route_shape:
                raise DataError(f"rollout {i}: routes of another shape than rollout 0's")
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
        p = len(r.prompt)
        if r.logprobs is not None:
            row["rollout_logp"] = _label_aligned(_per_token(r.logprobs, p, ids.size), s)
        if r.ref_logprobs is not None:
            row["ref_logp"] = _label_aligned(_per_token(r.ref_logprobs, p, ids.size), s)
        if r.routes is not None:
            row["routes"] = _route_rows(np.asarray(r.routes, dtype=np.int64).reshape(-1),
                                        self.route_shape, s)
        return row
