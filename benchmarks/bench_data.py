"""Data pipeline figures, all measured in one run (so ratios compare like with like):

1. preprocessing (k2m-preprocess) docs/s and tokens/s with 1 and 2 workers, both tokenizer kinds;
2. loader tokens/s of the DALI and torch backends on k2-tiny's shapes and on a larger one;
3. k2-tiny's training consumption (tokens/s of a full step: forward, backward, optimizer), and
   each loader's headroom over it.

    PYTHONPATH=. python benchmarks/bench_data.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k2mcore.config.loader import load_config  # noqa: E402
from k2mcore.data.datasets import ASSETS_DIR  # noqa: E402

CORPUS = ASSETS_DIR / "sample" / "stdlib_docs.jsonl"
TOKENIZERS = {"tiktoken": ASSETS_DIR / "tokenizer" / "k2-tiny.tiktoken",
              "tokenizer.json": ASSETS_DIR / "tokenizer" / "k2-tiny.tokenizer.json"}


def bench_preprocess(tmp: str, copies: int) -> None:
    from k2mcore.data.preprocess import preprocess

    src = os.path.join(tmp, "corpus.jsonl")
    text = CORPUS.read_text()
    with open(src, "w") as f:
        f.write(text * copies)
    mb = os.path.getsize(src) / 2**20
    print(f"\n== preprocessing: bundled corpus x{copies} ({mb:.1f} MiB jsonl, "
          f"{os.cpu_count()} CPUs), --append-eod, best of 2")
    print(f"{'tokenizer':<16}{'workers':>8}{'docs/s':>10}{'tokens/s':>12}{'speed-up':>10}")
    for name, tok in TOKENIZERS.items():
        base = None
        for workers in (1, 2):
            best = None
            for rep in range(2):
                s = preprocess([src], os.path.join(tmp, f"pp_{workers}_{rep}"), str(tok),
                               append_eod=True, workers=workers, progress=False)
                best = s if best is None or s.seconds < best.seconds else best
            base = base or best.tokens_per_s
            print(f"{name:<16}{workers:>8}{best.docs_per_s:>10.0f}{best.tokens_per_s:>12.0f}"
                  f"{best.tokens_per_s / base:>9.2f}x")


def loader_rate(cfg, batches: int) -> float:
    """Tokens/s the iterator delivers to a consumer that does nothing else (after 1 warm-up)."""
    from k2mcore.data import build_data_iterator

    it = build_data_iterator(cfg, dp_rank=0, dp_size=1, consumed_samples=0)
    next(it)
    n = min(batches, len(it))
    start = time.perf_counter()
    tokens = 0
    for _, b in zip(range(n), it):
        tokens += b["tokens"].numel()
    rate = tokens / (time.perf_counter() - start)
    it.close()
    return rate


def trainer_rate(tmp: str, steps: int) -> float:
    """k2-tiny's tokens/s over full training steps (1 rank, gloo), median after warm-up."""
    import torch

    from k2mcore.data import build_data_iterator
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import wrap_ddp
    from k2mcore.parallel.groups import destroy_distributed, init_distributed
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.training.step import forward_backward

    cfg = load_config("k2-tiny", [f"run.dir={tmp}/train", "data.loader=torch",
                                  "data.num_workers=0"])
    torch.set_num_threads(1)
    groups = init_distributed(resolve_layout(cfg, 1), seed=cfg.train.seed)
    try:
        model = wrap_ddp(build_model(cfg, groups), groups,
                         distributed_optimizer=cfg.parallel.distributed_optimizer)
        optimizer, _ = build_optimizer(cfg, model, groups)
        t = cfg.train
        data = build_data_iterator(cfg, dp_rank=0, dp_size=1, consumed_samples=0)
        times = []
        for _ in range(steps):
            batches = [next(data) for _ in range(t.global_batch_size // t.micro_batch_size)]
            start = time.perf_counter()
            forward_backward(model, groups, batches, seq_length=t.seq_length,
                             micro_batch_size=t.micro_batch_size)
            optimizer.step()
            times.append(time.perf_counter() - start)
        return t.global_batch_size * t.seq_length / statistics.median(times[1:])
    finally:
        destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller inputs (CI smoke)")
    args = p.parse_args()
    from k2mcore.data import dali_available

    with tempfile.TemporaryDirectory() as tmp:
        bench_preprocess(tmp, copies=2 if args.quick else 8)

        n = 500 if args.quick else 3000
        shapes = [("k2-tiny 1x64", []),
                  ("8x1024", ["train.micro_batch_size=8", "train.seq_length=1024",
                              "train.global_batch_size=64", "train.iters=60"])]
        backends = ["torch"] + (["dali"] if dali_available() else [])
        rates: dict[tuple, float] = {}
        print(f"\n== loaders: tokens/s delivered (dp=1, {n} micro-batches at most)")
        print(f"{'shape (mbs x seq)':<20}{'backend':<8}{'workers':>8}{'tokens/s':>12}")
        for label, sets in shapes:
            for backend in backends:
                for workers in (0, 2):
                    cfg = load_config("k2-tiny", [f"run.dir={tmp}/loader", *sets,
                                                  f"data.loader={backend}",
                                                  f"data.num_workers={workers}"])
                    rates[label, backend, workers] = r = loader_rate(cfg, n)
                    print(f"{label:<20}{backend:<8}{workers:>8}{r:>12.0f}")

        need = trainer_rate(tmp, steps=4 if args.quick else 8)
        print(f"\n== k2-tiny training step (1 rank, CPU): {need:.0f} tokens/s consumed")
        for backend in backends:
            for workers in (0, 2):
                r = rates["k2-tiny 1x64", backend, workers]
                print(f"{backend} loader, {workers} workers: {r / need:.0f}x the trainer's need")


if __name__ == "__main__":
    main()
