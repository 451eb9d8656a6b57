"""Weight sync: the policy's weights, in any layout, streamed to the rollout engines as Hugging
Face tensors, with no disk.

Who holds what comes from megatron itself: each rank's `sharded_state_dict()` names every piece
it holds of each tensor (key, global shape, offset, replica id; SwiGLU's fc1 halves through their
factories), as for a checkpoint. Once, at start, the ranks exchange those descriptions; the
export (`k2m-convert mcore-to-hf`'s walk over the model, k2mcore.hf.mapping) is cut into buckets
of at most `rl.sync_bucket_mb` of HF tensors (a single tensor larger than that travels alone).
Per bucket, the one rank holding the main replica of each piece sends it point to point to every
engine rank (the first rank of each data-parallel replica), which puts the tensors together in
their 1-rank shape and maps them to HF names with the converter's own `export_entry`: TP shards
gathered, pipeline stages and EP experts brought over, bit for bit what the export writes.

Why not megatron's `resharding/refit.py`: it moves weights from one megatron model to another
megatron model (its plan pairs the two models' parameters by megatron name and layout); the
engine here is transformers' model under HF names, so refit would need a second, 1-rank megatron
model on every engine rank (the whole model's memory again) and then the name mapping anyway.
The transfer here is the same idea (each piece sent once by its owner) without that copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from k2mcore.config.schema import ModelConfig


@dataclass
class SyncReport:
    """One sync: the version sent, seconds on this rank, bytes the engines received from other
    ranks (all engines together), the HF bytes each engine got, buckets and HF tensors."""

    version: int
    seconds: float
    bytes_moved: int
    bytes_per_engine: int
    buckets: int
    tensors: int


@dataclass(frozen=True)
class _Piece:
    key: str
    index: tuple  # ints for the prepended (expert) axes, slices for the tensor's own
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def _needed(model: ModelConfig) -> list[tuple[tuple[str, str, bool], list[tuple[str, str, Optional[int], tuple]]]]:
    """Per export entry (walk's (megatron name, HF name, gated)): its 1-rank megatron tensors as
    (name, sharded key, expert index or None, 1-rank shape)."""
    from k2mcore.convert.shapes import dcp_key, expected_shapes
    from k2mcore.hf.mapping import walk

    shapes = expected_shapes(model)
    out = []
    for mc, hf, gated in walk(model):
        names = [mc + "linear_fc1.weight", mc + "linear_fc2.weight"] if gated else [mc]
        tensors = []
        for name in names:
            key, _, _, e = dcp_key(name, shapes[name], model)
            tensors.append((name, key, e, shapes[name]))
        out.append(((mc, hf, gated), tensors))
    return out


def _index(sh: Any) -> tuple:
    pre = sh.prepend_axis_num
    return tuple(sh.global_offset[:pre]) + tuple(
        slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.local_shape))


def local_pieces(chunks: Sequence[torch.nn.Module], keys: set[str]) -> list[tuple[_Piece, torch.Tensor]]:
    """This rank's main-replica pieces of the tensors under `keys` (parameters and the routers'
    expert-bias buffers), from megatron's sharded state dict, with their data."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        apply_factories,
        is_main_replica,
    )

    out = []
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap megatron DDP
        kept = {str(i): item for i, item in enumerate(nested_values(module.sharded_state_dict()))
                if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and item.key in keys}
        apply_factories(kept)
        for sh in nested_values(kept):
            if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
                data = sh.data.detach()
                out.append((_Piece(sh.key, _index(sh), tuple(data.shape), data.dtype), data))
    return out


class WeightSync:
    """Built once on every rank (collective: the pieces' descriptions are exchanged); `push`
    (collective too) sends the current weights to the engines, bucket by bucket."""

    def __init__(self, chunks: Sequence[torch.nn.Module], groups: Any, model: ModelConfig, *,
                 bucket_mb: float, is_engine: bool) -> None:
        self.chunks, self.model = chunks, model
        self.rank = dist.get_rank()
        self.entries = _needed(model)
        self.keys = {key for _, tensors in self.entries for _, key, _, _ in tensors}
        pieces = [p for p, _ in local_pieces(chunks, self.keys)]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (pieces, bool(is_engine)))
        self.pieces = [p for p, _ in everyone]  # per rank, in its own order
        self.engines = [r for r, (_, e) in enumerate(everyone) if e]
        if not self.engines:
            raise ValueError("weight sync: no rank hosts an engine")
        self.is_engine = bool(is_engine)
        self.buckets = self._plan(int(bucket_mb * 2**20))

    def _plan(self, limit: int) -> list[dict]:
        """Buckets of consecutive export entries: each the entries, and per rank the positions of
        its pieces the bucket needs."""
        where: dict[tuple[str, Optional[int]], list[tuple[int, int]]] = {}
        for rank, pieces in enumerate(self.pieces):
            for j, p in enumerate(pieces):
                e = p.index[0] if isinstance(p.index[0], int) else None
                where.setdefault((p.key, e), []).append((rank, j))
        buckets, size = [], 0
        for entry, tensors in self.entries:
            nbytes = 0
            need: list[tuple[int, int]] = []
            for name, key, e, shape in tensors:
                found = where.get((key, e))
                if not found:
                    raise ValueError(f"weight sync: no rank holds {name} ({key})")
                need += found
                nbytes += int(torch.Size(shape).numel()) * self.pieces[found[0][0]][found[0][1]].dtype.itemsize
            if not buckets or size + nbytes > limit:
                buckets.append({"entries": [], "pieces": {}, "bytes": 0})
                size = 0
            b = buckets[-1]
            b["entries"].append((entry, tensors))
            for rank, j in need:
                b["pieces"].setdefault(rank, []).append(j)
            b["bytes"] += nbytes
            size += nbytes
        return buckets

    @property
    def bucket_bytes(self) -> list[int]:
        return [b["bytes"] for b in self.buckets]

    def push(self, engine: Any, version: int) -> SyncReport:
        """Send the weights to every engine (`engine`: this rank's, or None where it hosts none),
        which takes them at `version`."""
        start = time.perf_counter()
        stream = self.stream()
        if engine is not None:
            engine.update_weights(stream, version)
        for _ in stream:  # the sends of a rank without an engine (or whatever an engine left)
            pass
        moved = sum(self.pieces[rank][j].nbytes for b in self.buckets
                    for rank, js in b["pieces"].items() for j in js for d in self.engines
                    if d != rank)
        tensors = sum(len(_hf_names(entry)) for b in self.buckets for entry, _ in b["entries"])
        return SyncReport(version, time.perf_counter() - start, moved, sum(self.bucket_bytes),
                          len(self.buckets), tensors)

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) of every export tensor on an engine rank; nothing elsewhere. Every
        rank must drive it to the end (the sends happen as it goes)."""
        from k2mcore.hf.mapping import export_entry

        held = local_pieces(self.chunks, self.keys)
        if [p for p, _ in held] != self.pieces[self.rank]:
            raise RuntimeError("weight sync: this rank's shards changed since the plan was made")
        for b in self.buckets:
            received = self._exchange(b, held)
            if not self.is_engine:
                continue
            full = self._assemble(b, received)
            for (mc, hf, gated), _ in b["entries"]:
                yield from export_entry(lambda name: full[name], self.model, mc, hf, gated)

    def _exchange(self, bucket: dict, held: list) -> dict[int, list[torch.Tensor]]:
        """Owners send their pieces of the bucket to each engine (one flat message per owner and
        engine); an engine returns every owner's pieces, its own included."""
        mine = bucket["pieces"].get(self.rank, [])
        works, received = [], {}
        if mine:
            flat = torch.cat([held[j][1].contiguous().view(-1).view(torch.uint8) for j in mine])
            for d in self.engines:
                if d != self.rank:
                    works.append(dist.isend(flat, d))
            if self.is_engine:
                received[self.rank] = [held[j][1] for j in mine]
        buffers = {}
        if self.is_engine:
            for rank, js in bucket["pieces"].items():
                if rank != self.rank:
                    buffers[rank] = torch.empty(sum(self.pieces[rank][j].nbytes for j in js),
                                                dtype=torch.uint8)
                    works.append(dist.irecv(buffers[rank], rank))
        for w in works:
            w.wait()
        for rank, buf in buffers.items():
            out, at = [], 0
            for j in bucket["pieces"][rank]:
                p = self.pieces[rank][j]
                out.append(buf[at:at + p.nbytes].view(p.dtype).view(p.shape))
                at += p.nbytes
            received[rank] = out
        return received

    def _assemble(self, bucket: dict, received: dict) -> dict[str, torch.Tensor]:
        """The bucket's 1-rank megatron tensors, by name, from the pieces."""
        by_key: dict[tuple[str, Optional[int]], list] = {}
        for rank, js in bucket["pieces"].items():
            for j, data in zip(js, received[rank]):
                p = self.pieces[rank][j]
                e = p.index[0] if isinstance(p.index[0], int) else None
                by_key.setdefault((p.key, e), []).append((p, data))
        full = {}
        for _, tensors in bucket["entries"]:
            for name, key, e, shape in tensors:
                parts = by_key[(key, e)]
                t = torch.empty(shape, dtype=parts[0][1].dtype)
                for p, data in parts:
                    t[p.index[1:] if e is not None else p.index] = data
                full[name] = t
        return full


def _hf_names(entry: tuple[str, str, bool]) -> list[str]:
    mc, hf, gated = entry
    return [hf + s for s in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")] \
        if gated else [hf]
