"""The long-context recipe end to end (tools/long_context_recipe.py, `make long-context`), at toy
sizes: k2-tiny at 64 tokens, then resumed from that checkpoint at 256 tokens with K2's YaRN
fields on CP2 (blockwise attention). The extension resumes the short run (its step, its loss),
the rope scaling reaches the model, and the validation loss at the long length falls below the
short checkpoint's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.launching import local_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "long_context_recipe.py")


def test_context_extension_resumes_the_short_run_and_lowers_the_long_validation_loss(tmp_path):
    out = str(tmp_path / "lc")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", out, "--short", "64", "--long", "256",
                           "--short-iters", "20", "--long-iters", "10", "--batch", "4",
                           "--block", "64"], env=local_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    r = json.load(open(os.path.join(out, "recipe.json")))
    long = r["long"]
    assert long["first_step"] == 21  # resumed at the short run's step, not from scratch
    assert long["first_loss"] < 6.5 < 6.9  # from scratch k2-tiny starts at ln(1024) = 6.93
    assert long["val_loss"] < r["before, yarn"]["val_loss"]
    assert "| long (YaRN, CP2), from step 20 | 256 | 10 |" in proc.stdout
    # the extension run's config: YaRN stretched 4x over the short length, CP2
    with open(os.path.join(out, "long", "config.yaml")) as f:
        text = f.read()
    assert "factor: 4.0" in text and "original_max_position_embeddings: 64" in text
    assert "cp: 2" in text and "seq_length: 256" in text
