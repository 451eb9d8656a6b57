"""benchmarks/gpu_check.sh --cpu: the GPU check's code paths at toy sizes on CPU, so the script
a GPU machine runs in its few minutes cannot rot between visits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_mode_runs_every_part_and_writes_the_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               K2M_GPU_SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    r = json.load(open(tmp_path / "gpu_check.json"))
    c = r["correctness"]
    # the dry mode's "device" is this CPU: the fp32 run is the reference run, bit for bit
    assert c["fp32"]["max_rel_diff"] == 0.0 and c["fp32"]["ok"]
    assert c["fp32"]["clipped_heads"] == c["cpu_clipped_heads"] and c["cpu_clipped_heads"][0] > 0
    assert c["bf16"]["ok"] and c["bf16"]["max_rel_diff"] <= 2e-2
    # blockwise attention on the "device" against the plain attention of the reference run
    assert c["blockwise"]["ok"] and c["blockwise"]["max_rel_diff"] <= 1e-5
    assert c["blockwise"]["clipped_heads"] == c["cpu_clipped_heads"]
    assert len(c["cpu_losses"]) == 5
    runs = r["proxy"]["runs"]
    assert [(x["optimizer"], x["probe"]) for x in runs] == [
        ("adamw", False), ("adamw", True), ("muonclip", True)]
    assert all(x["tokens_per_s"] > 0 and 0 < x["mfu"] < 1 and x["params"] > 0 for x in runs)
    ns = r["proxy"]["newton_schulz"]
    assert ns["matrices"] > 0 and ns["tflops"] > 0
    out = proc.stdout
    assert "| k2-tiny fp32 vs CPU" in out and "| muonclip, probe on |" in out
    assert "Newton-Schulz" in out and "warn" not in (proc.stderr + out).lower()


def test_without_a_gpu_and_without_cpu_it_says_so_in_one_line():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == \
        "gpu_check: no CUDA device (use --cpu for the dry mode)"
