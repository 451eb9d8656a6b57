"""Loaders over megatron's datasets: DALI == torch, blend proportions, resume, DP sharding."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.data_helpers import make_cfg, random_docs, write_dataset
from k2mcore.data import build_data_iterator, dali_available, resolve_path
from k2mcore.data.batches import MicroBatchSampler
from k2mcore.data.tokenizers import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["torch", "dali"]
# token ranges per synthetic dataset: a sample's tokens say which dataset it came from
RANGES = {"a": (0, 300), "b": (300, 600), "c": (600, 1000)}


def test_dali_imports():
    """The DALI backend is real here, not skipped: nvidia-dali-cuda120 is a requirement."""
    assert dali_available()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    for seed, (name, (lo, hi)) in enumerate(RANGES.items()):
        write_dataset(str(d / name), random_docs(seed, 300, lo, hi))
    return d


def _cfg(tmp_path, data_dir, blend, *overrides):
    blend = " ".join(str(data_dir / p) if p in RANGES else p for p in blend.split())
    return make_cfg(tmp_path, blend, "train.micro_batch_size=2", "train.global_batch_size=8",
                    *overrides)


def _collect(cfg, n=None, **kw):
    it = build_data_iterator(cfg, **kw)
    batches = [b for _, b in zip(range(n if n is not None else len(it)), it)]
    it.close()
    return batches


def _same(xs, ys):
    assert len(xs) == len(ys) and len(xs) > 0
    for x, y in zip(xs, ys):
        assert set(x) == set(y) == {"tokens", "labels", "loss_mask", "position_ids"}
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _source(tokens: torch.Tensor) -> str:
    (name,) = [n for n, (lo, hi) in RANGES.items() if lo <= int(tokens[0]) < hi]
    lo, hi = RANGES[name]
    assert int(tokens.min()) >= lo and int(tokens.max()) < hi  # never mixes datasets
    return name


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_dali_and_torch_give_identical_batches(tmp_path, data_dir, dp_rank):
    cfg = _cfg(tmp_path, data_dir, "0.3 a 0.7 b", "train.iters=25")
    kw = dict(dp_rank=dp_rank, dp_size=2, consumed_samples=0)
    runs = {}
    for backend in BACKENDS:
        for workers in (0, 2):
            cfg.data.loader, cfg.data.num_workers = backend, workers
            runs[backend, workers] = _collect(cfg, **kw)
    ref = runs["torch", 0]
    assert len(ref) == 50  # 200 samples / (mbs 2 x dp 2)
    for key, batches in runs.items():
        _same(batches, ref)
    b = ref[0]
    assert b["tokens"].shape == (2, 64) and b["tokens"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])  # next-token labels


def test_blend_proportions_follow_weights(tmp_path, data_dir):
    weights = {"a": 0.2, "b": 0.3, "c": 0.5}
    blend = " ".join(f"{w} {n}" for n, w in weights.items())
    cfg = _cfg(tmp_path, data_dir, blend, "train.iters=500", "data.loader=torch")
    cfg.train.micro_batch_size = 8
    counts = dict.fromkeys(weights, 0)
    batches = _collect(cfg, dp_rank=0, dp_size=1, consumed_samples=0)
    for batch in batches:
        for row in batch["tokens"]:
            counts[_source(row)] += 1
    total = sum(counts.values())
    assert total >= 4000
    for name, w in weights.items():
        assert abs(counts[name] / total - w) < 0.01, (counts, weights)
    # and the early part of the stream is mixed too, not dataset after dataset
    first = [_source(r) for b in batches[:25] for r in b["tokens"]]
    assert all(abs(first.count(n) / len(first) - w) < 0.05 for n, w in weights.items())


def test_prefix_only_blend_weights_by_size(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "a b", "train.iters=30", "data.loader=torch")
    batches = _collect(cfg, dp_rank=0, dp_size=1, consumed_samples=0)
    names = [_source(r) for b in batches for r in b["tokens"]]
    assert {"a", "b"} == set(names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_with_the_next_samples(tmp_path, data_dir, backend):
    cfg = _cfg(tmp_path, data_dir, "0.5 a 0.5 c", "train.iters=10", "data.loader=torch")
    per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * 2)  # 2 per rank
    for rank in (0, 1):
        full = build_data_iterator(cfg, dp_rank=rank, dp_size=2, consumed_samples=0)
        steps = 4
        before = [next(full) for _ in range(steps * per_step)]
        consumed = full.consumed_samples
        assert consumed == steps * cfg.train.global_batch_size
        after = list(full)
        cfg.data.loader = backend
        resumed = _collect(cfg, dp_rank=rank, dp_size=2, consumed_samples=consumed)
        cfg.data.loader = "torch"
        _same(resumed, after)
        assert len(before) + len(resumed) == 10 * per_step
        seen = {tuple(r.tolist()) for b in before for r in b["tokens"]}
        assert not any(tuple(r.tolist()) in seen for b in resumed for r in b["tokens"])


def test_dp_ranks_get_disjoint_shares_of_one_stream(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "0.4 b 0.6 c", "train.iters=10", "data.loader=torch")
    stream = _collect(cfg, dp_rank=0, dp_size=1, consumed_samples=0)  # mbs 2, one rank
    ranks = [_collect(cfg, dp_rank=r, dp_size=4, consumed_samples=0) for r in range(4)]
    for r, batches in enumerate(ranks):
        # rank r's i-th micro-batch is micro-batch 4i + r of the single-rank stream
        _same(batches, stream[r::4][:len(batches)])
    rows = [tuple(x.tolist()) for batches in ranks for b in batches for x in b["tokens"]]
    assert len(rows) == len(set(rows)) == 80
    # the index-level statement of the same
    samplers = [MicroBatchSampler(80, 0, 2, r, 4) for r in range(4)]
    sets = [set(i for batch in s for i in batch) for s in samplers]
    assert all(not (sets[i] & sets[j]) for i in range(4) for j in range(i + 1, 4))
    assert set().union(*sets) == set(range(80))


def test_bundled_sample_trains_on_real_text(tmp_path):
    """The k2-tiny preset as shipped: real text, ids inside the model's vocab."""
    from k2mcore.config.loader import load_config

    cfg = load_config("k2-tiny", [f"run.dir={tmp_path}"])
    it = build_data_iterator(cfg, dp_rank=0, dp_size=1, consumed_samples=0)
    assert len(it) >= cfg.train.iters * cfg.train.global_batch_size
    tok = load_tokenizer(resolve_path(cfg.data.tokenizer))
    words = 0
    for _, batch in zip(range(8), it):
        assert int(batch["tokens"].max()) < cfg.model.vocab_size
        words += sum(w.isalpha() for w in tok.decode(batch["tokens"][0].tolist()).split())
    it.close()
    assert words > 8 * 5  # English words, not noise
    assert os.path.isdir(os.path.join(tmp_path, "data_cache"))


def test_mock_data_when_no_blend(tmp_path):
    cfg = make_cfg(tmp_path, None, "train.iters=3", "data.loader=torch")
    batches = _collect(cfg, dp_rank=0, dp_size=1, consumed_samples=0, n=4)
    assert all(int(b["tokens"].max()) < cfg.model.vocab_size for b in batches)


def test_under_a_gloo_process_group(tmp_path, data_dir):
    """Two ranks under torchrun: rank 0 builds the index cache, rank 1 reads it after megatron's
    barrier; each gets exactly its share of the single-process stream."""
    cfg = _cfg(tmp_path, data_dir, "0.3 a 0.7 b", "train.iters=6", "data.loader=torch")
    want = [_collect(cfg, dp_rank=r, dp_size=2, consumed_samples=8) for r in (0, 1)]
    out = tmp_path / "pg"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "pg_worker.py"), "--out", str(out), "--blend", cfg.data.blend,
           "--cache", str(tmp_path / "pg_cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        got = torch.load(out / f"rank{r}.pt", weights_only=True)
        assert got["backend"] == ("dali" if dali_available() else "torch")
        _same(got["batches"], want[r])
    assert np.any([f.endswith("shuffle_index.npy") for f in os.listdir(tmp_path / "pg_cache")])
