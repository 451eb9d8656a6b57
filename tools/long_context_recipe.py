"""Context extension as K2 did it, on k2-tiny: a short-context run, then the same weights and
optimizer trained on longer sequences with YaRN rope scaling and context parallelism
(`make long-context`).

1. short: k2-tiny on the bundled corpus at --short tokens, DP2, saved at its last step;
2. the short checkpoint's validation loss at --long tokens, measured by a zero-learning-rate
   step at the long length (CP2, blockwise attention): without rope scaling, and with YaRN
   (K2's fields: factor = long / short over original_max_position_embeddings = short,
   beta_fast = beta_slow = mscale = mscale_all_dim = 1);
3. long: resumed from the short checkpoint (`checkpoint.load`: weights, optimizer, step) at
   --long tokens with YaRN on CP2, --long-iters more steps; its validation loss at that length.

    python tools/long_context_recipe.py --out runs/long-context [--short 128] [--long 512]

Prints one table and writes `recipe.json` under --out. Exit status 0 when the extended model's
validation loss at the long length is below the short checkpoint's with YaRN. The steps run
`python -m k2mcore.cli.train` with this interpreter under torchrun (2 gloo ranks on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(out: str, name: str, nproc: int, sets: list[str]) -> list[dict]:
    """One k2m-train run under torchrun; its metrics rows."""
    run = os.path.join(out, name)
    args = ["--config", "k2-tiny", "--set", f"run.dir={run}", "--set", "logging.tensorboard=false",
            "--set", "data.loader=torch", "--set", "data.num_workers=0"]
    for s in sets:
        args += ["--set", s]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "k2mcore.cli.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"long_context_recipe: {name} failed (exit {proc.returncode}): {tail}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def yarn(short: int, long: int) -> list[str]:
    """K2's rope-scaling fields (its preset's), stretched from `short` to `long` tokens."""
    return ["model.rope_scaling.type=yarn", f"model.rope_scaling.factor={long / short:g}",
            f"model.rope_scaling.original_max_position_embeddings={short}",
            "model.rope_scaling.beta_fast=1", "model.rope_scaling.beta_slow=1",
            "model.rope_scaling.mscale=1", "model.rope_scaling.mscale_all_dim=1"]


def recipe(out: str, short: int, long: int, short_iters: int, long_iters: int,
           batch: int, block: int) -> dict:
    common = [f"train.global_batch_size={batch}", "train.eval_iters=2",
              f"model.max_position_embeddings={long}"]
    ckpt = os.path.join(out, "short", "checkpoints")
    rows = _train(out, "short", 2, common + [
        f"train.seq_length={short}", f"train.iters={short_iters}",
        f"train.eval_interval={short_iters}", f"checkpoint.interval={short_iters}"])
    result = {"short": {"seq_length": short, "iters": short_iters, "loss": rows[-1]["loss"],
                        "val_loss": rows[-1]["val_loss"]}}
    at_long = common + [f"train.seq_length={long}", "parallel.cp=2",
                        f"model.attention_block_size={block}", f"checkpoint.load={ckpt}"]
    frozen = ["optimizer.lr=0", "optimizer.min_lr=0", "optimizer.warmup_iters=0",
              f"train.iters={short_iters + 1}", "train.eval_interval=1"]
    for name, rope in (("no scaling", []), ("yarn", yarn(short, long))):
        rows = _train(out, "eval-" + name.replace(" ", "-"), 2, at_long + frozen + rope)
        result[f"before, {name}"] = {"seq_length": long, "val_loss": rows[-1]["val_loss"]}
    rows = _train(out, "long", 2, at_long + yarn(short, long) + [
        f"train.iters={short_iters + long_iters}", f"train.eval_interval={long_iters}"])
    result["long"] = {"seq_length": long, "iters": long_iters, "first_step": rows[0]["step"],
                      "first_loss": rows[0]["loss"], "loss": rows[-1]["loss"],
                      "val_loss": rows[-1]["val_loss"]}
    return result


def table(r: dict) -> str:
    s, lo = r["short"], r["long"]
    return "\n".join([
        "| phase | tokens | steps | train loss | validation loss |",
        "|---|---|---|---|---|",
        f"| short | {s['seq_length']} | {s['iters']} | {s['loss']:.4f} | {s['val_loss']:.4f} |",
        f"| short checkpoint, no rope scaling | {lo['seq_length']} | - | - | "
        f"{r['before, no scaling']['val_loss']:.4f} |",
        f"| short checkpoint, YaRN | {lo['seq_length']} | - | - | "
        f"{r['before, yarn']['val_loss']:.4f} |",
        f"| long (YaRN, CP2), from step {lo['first_step'] - 1} | {lo['seq_length']} | "
        f"{lo['iters']} | {lo['first_loss']:.4f} -> {lo['loss']:.4f} | {lo['val_loss']:.4f} |",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "long-context"))
    ap.add_argument("--short", type=int, default=128, help="short-context tokens")
    ap.add_argument("--long", type=int, default=512, help="extended tokens (a multiple of 4)")
    ap.add_argument("--short-iters", type=int, default=60)
    ap.add_argument("--long-iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="train.global_batch_size")
    ap.add_argument("--block", type=int, default=128, help="model.attention_block_size")
    args = ap.parse_args()
    if args.long <= args.short or args.long % 4:
        print("long_context_recipe: --long must exceed --short and be a multiple of 4 "
              "(2 x cp)", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    r = recipe(args.out, args.short, args.long, args.short_iters, args.long_iters, args.batch,
               args.block)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(table(r))
    return 0 if r["long"]["val_loss"] < r["before, yarn"]["val_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
