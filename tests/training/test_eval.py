"""Validation loss (train.eval_interval / eval_iters) after chat fine-tuning: the masked mean
token loss over the held-out samples, the same number `load_model`'s logits give on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness.launching import local_command, local_env

K2M_TRAIN = os.path.join(os.path.dirname(sys.executable), "k2m-train")


def test_sft_val_loss_is_the_masked_mean_of_load_models_logits(tmp_path):
    """Fine-tuned on the bundled chat sample (data.format=chat: assistant tokens only) at
    DP2 x EP2 with MuonClip, evaluated after step 2 on 2 global batches of the valid split;
    recomputed here in one process from the saved weights and the same held-out samples."""
    run = str(tmp_path / "run")
    sets = ["data.format=chat", "data.blend=assets:sample/stdlib_chat",
            "data.tokenizer=assets:tokenizer/k2-tiny", "optimizer.name=muonclip",
            "train.iters=2", "train.eval_interval=2", "train.eval_iters=2",
            "train.global_batch_size=4", "train.seq_length=128", "checkpoint.interval=2",
            "parallel.ep=2", "optimizer.lr=1e-2", f"run.dir={run}"]
    args = ["--config", "k2-tiny"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(local_command(2, K2M_TRAIN, args), env=local_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [("val_loss" in r) for r in rows] == [False, True]
    assert "val loss" in proc.stdout
    val = rows[-1]

    from k2mcore import load_model
    from k2mcore.config.loader import load_config
    from k2mcore.data.datasets import build_datasets

    cfg = load_config(os.path.join(run, "config.yaml"))
    valid = build_datasets(cfg)["valid"]
    model = load_model(os.path.join(run, "checkpoints"))
    total = count = 0.0
    masked = 0
    with torch.no_grad():
        for i in range(cfg.train.eval_iters * cfg.train.global_batch_size):
            s = valid[i]
            logits = model(torch.as_tensor(s["tokens"])[None])[0]
            ce = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(s["labels"]),
                                                   reduction="none")
            mask = torch.as_tensor(s["loss_mask"], dtype=torch.float64)
            total += float((ce * mask).sum())
            count += float(mask.sum())
            masked += int((mask == 0).sum())
    assert masked > count  # most tokens (system, user turns, padding) carry no loss
    want = total / count
    assert abs(val["val_loss"] - want) <= 1e-5 * want, (val["val_loss"], want)
    assert abs(val["val_ppl"] - torch.exp(torch.tensor(want)).item()) <= 1e-4 * val["val_ppl"]


@pytest.mark.parametrize("cp", [1, 2])
def test_packed_sft_trains_and_validates_on_whole_documents(tmp_path, cp):
    """data.packing at 1 rank, and at CP2 (every conversation padded to a multiple of 4, two
    chunks of each per rank, attended blockwise), two packed rows per micro-batch: the
    validation loss equals the masked mean of load_model's logits on the same packed rows on 1
    rank, each document on its own (cu_seqlens from the rows' position_ids), so the trainer ran
    them as THD documents."""
    run = str(tmp_path / "run")
    sets = [f"parallel.cp={cp}", "model.attention_block_size=128", "data.format=chat", "data.blend=assets:sample/stdlib_chat",
            "data.tokenizer=assets:tokenizer/k2-tiny", "data.packing=true", "train.iters=1",
            "train.eval_interval=1", "train.eval_iters=1", "train.global_batch_size=2",
            "train.micro_batch_size=2", "train.seq_length=512", "checkpoint.interval=1",
            # the cheapest start: no loader workers, no TensorBoard writer
            "data.loader=torch", "data.num_workers=0", "logging.tensorboard=false",
            f"run.dir={run}"]
    args = ["--config", "k2-tiny"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(local_command(cp, K2M_TRAIN, args), env=local_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]

    from k2mcore import load_model
    from k2mcore.config.loader import load_config
    from k2mcore.data.datasets import build_datasets
    from k2mcore.model.packing import cu_seqlens_from_positions

    cfg = load_config(os.path.join(run, "config.yaml"))
    valid = build_datasets(cfg)["valid"]
    model = load_model(os.path.join(run, "checkpoints"))
    total = count = 0.0
    docs = 0
    with torch.no_grad():
        for i in range(cfg.train.global_batch_size):
            s = {k: torch.as_tensor(v) for k, v in valid[i].items()}
            cu = cu_seqlens_from_positions(s["position_ids"])
            docs += len(cu) - 1
            logits = model(s["tokens"][None], cu_seqlens=cu)[0]
            ce = torch.nn.functional.cross_entropy(logits.double(), s["labels"], reduction="none")
            total += float((ce * s["loss_mask"].double()).sum())
            count += float(s["loss_mask"].sum())
    assert docs >= 4  # several conversations (and padding) per row
    want = total / count
    assert abs(row["val_loss"] - want) <= 1e-5 * want, (row["val_loss"], want)
