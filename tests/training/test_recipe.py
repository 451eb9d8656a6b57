"""The fine-tuning recipe end to end (tools/sft_recipe.py, `make sft`): a random DeepseekV3
release -> k2m-convert hf-to-mcore -> k2m-train on packed chat data with MuonClip at TP2 x EP2
from the converted weights -> k2m-convert mcore-to-hf -> transformers, whose greedy generation
reproduces every trained reply."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from harness.launching import local_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "sft_recipe.py")


def _recipe():
    spec = importlib.util.spec_from_file_location("sft_recipe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_released_weights_sft_to_hugging_face_reproduces_the_replies(tmp_path):
    out = str(tmp_path / "sft")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", out], env=local_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every reply reproduced" in proc.stdout
    log = open(os.path.join(out, "recipe.log")).read()
    assert "TP2 PP1 EP2 ETP1" in log  # the layout asked for
    assert "initialized weights from " + os.path.join(out, "ckpt-init") in log  # the converted release
    assert "2 rows of 127 for 3 conversations" in log  # packed: two conversations share a row

    # the tuned export differs from the release in every trained matrix, and has the same tensors
    base = load_file(os.path.join(out, "hf-base", "model.safetensors"))
    tuned = {}
    for f in os.listdir(os.path.join(out, "hf-tuned")):
        if f.endswith(".safetensors"):
            tuned.update(load_file(os.path.join(out, "hf-tuned", f)))
    assert set(tuned) == set(base)
    assert not torch.equal(tuned["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
                           base["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].float())

    # the release's config.json came back unchanged (same architecture, fp32 both), and its
    # generation config and tokenizer files byte for byte, carried by the trainer's checkpoints
    hf_base, hf_tuned = os.path.join(out, "hf-base"), os.path.join(out, "hf-tuned")
    src, got = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_base, hf_tuned))
    assert got == src
    kept = [f for f in os.listdir(hf_base) if not f.endswith(".safetensors") and f != "config.json"]
    assert "generation_config.json" in kept and "tokenizer_config.json" in kept
    for f in kept:
        assert open(os.path.join(hf_tuned, f), "rb").read() == open(os.path.join(hf_base, f), "rb").read(), f

    # greedy generation again, here, in transformers: every trained reply, exactly
    recipe = _recipe()
    results = recipe.generate(os.path.join(out, "hf-tuned"))
    assert [got for _, _, got in results] == [reply for _, reply in recipe.TASK]
    saved = json.load(open(os.path.join(out, "generations.json")))
    assert [r["generated"] for r in saved] == [reply for _, reply in recipe.TASK]
