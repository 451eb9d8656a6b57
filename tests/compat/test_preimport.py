"""compat/preimport.py: `import k2mcore` arranges megatron's import-time settings without
importing torch; on this CPU-only machine megatron's torch.compile'd functions stay eager."""
from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, os, sys, types
import k2mcore
before = {"torch": "torch" in sys.modules, "megatron": "megatron" in sys.modules}
import megatron.core.transformer.moe.router as router
fn = router.TopKRouter._apply_expert_bias
print(json.dumps({"before": before, "env": os.environ.get("TORCHDYNAMO_DISABLE"),
                  "plain": isinstance(fn, types.FunctionType) and not hasattr(fn, "__wrapped__"),
                  "finders": [type(f).__name__ for f in sys.meta_path]}))
"""


def test_the_first_megatron_import_runs_the_hook_once():
    env = {"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}  # no TORCHDYNAMO_DISABLE given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == {"torch": False, "megatron": False}  # import k2mcore stays light
    assert got["env"] == "1"
    # megatron's @jit_fuser (torch.compile) returned the router's expert-bias update unchanged
    assert got["plain"]
    assert "_FirstMegatronImport" not in got["finders"]  # removed after it ran
