"""`k2m-preprocess --rollouts`: rollouts (jsonl, k2mcore.rl.rollouts.Rollout) -> the megatron
indexed datasets `k2mcore.rl.rollouts.rollout_prefixes` names, checked record by record (one
line naming the file and line), written under temporary names until every one is complete.
Lines are encoded in `workers` processes, in order, so the output does not depend on their
number."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from k2mcore.data import pipeline
from k2mcore.data.indexed import write_meta
from k2mcore.errors import DataError

from .rollouts import OPTIONAL, Rollout, _per_token, rollout_prefixes


@dataclass
class RolloutStats(pipeline.PipelineStats):
    rollouts: int = 0
    groups: int = 0
    response_tokens: int = 0
    with_logprobs: bool = False
    with_routes: bool = False
    with_ref: bool = False
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
    routes = shape = None
    if r.routes is not None:
        routes = np.asarray(r.routes, dtype=np.int32)  # [positions, layers, k]
        shape = routes.shape[1:]
        routes = routes.reshape(-1)
    optional = {"logprobs": _per_token(r.logprobs, p, ids.size), "routes": routes,
                "ref_logprobs": _per_token(r.ref_logprobs, p, ids.size)}
    return where, r.group, r.reward, r.truncated, p, ids, mask, optional, shape, len(raw)


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

    kinds = ["ids", "mask", "rollout", *OPTIONAL]
    dtypes = [dtype, np.uint8, np.float64, np.float32, np.int32, np.float32]
    # a run of equal ids is a group; its first line, for the one-sample message
    run_id: Any = None
    run_where, run_size = "", 0
    present: Optional[dict] = None  # which optional fields the first rollout carries
    route_shape = None  # (MoE layers, k) of the first rollout's routes
    with pipeline.DatasetWriter([names[k] for k in kinds], dtypes) as out, pipeline.encoded(
            paths, items, _init_worker, (tok.vocab_size, dtype), _encode, workers=workers,
            chunk_size=chunk_size, progress=progress, rate=rate) as results:
        for where, group, reward, truncated, p, ids, mask, optional, shape, nbytes in results:
            has = {k: v is not None for k, v in optional.items()}
            if present is None:
                present, route_shape = has, shape
            for key in OPTIONAL:
                if has[key] != present[key]:
                    raise DataError(f"{where}: {'has' if has[key] else 'has no'} {key}, unlike "
                                    f"the first rollout (all rollouts carry it or none)")
            if shape != route_shape:
                raise DataError(f"{where}: routes for {shape[0]} MoE layers of {shape[1]} "
                                f"experts, the first rollout's for {route_shape[0]} of "
                                f"{route_shape[1]}")
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
            for i, key in enumerate(OPTIONAL):
                if optional[key] is not None:
                    out.add(3 + i, optional[key])
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
        stats.with_logprobs = present["logprobs"]
        stats.with_routes, stats.with_ref = present["routes"], present["ref_logprobs"]
        for i in reversed(range(len(OPTIONAL))):  # absent fields: no (empty) dataset either
            if not present[OPTIONAL[i]]:
                out.drop(3 + i)
    stats.outputs = [names[k] for k in kinds[:3]] + [names[k] for k in OPTIONAL if present[k]]
    meta = {"format": "rollouts", "tokenizer": {**tok.describe(), "path": tok.name},
            "documents": stats.rollouts, **{k: present[k] for k in OPTIONAL}, **stats.counts(),
            "inputs": [os.path.basename(x) for x in paths]}
    if route_shape is not None:
        meta["moe_layers"], meta["topk"] = int(route_shape[0]), int(route_shape[1])
    out.commit()
    for p in stats.outputs:
        write_meta(p, meta)
    return stats
