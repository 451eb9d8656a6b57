"""What the recipes (tools/sft_recipe.py, tools/rl_recipe.py) share: the output directory, which
a new run replaces only when an earlier recipe run made it, and the steps' environment."""
from __future__ import annotations

import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_output(out: str, recipe: str) -> str:
    """`out` made empty (a previous recipe run is replaced; anything else is left alone) with
    its `recipe.log` path returned."""
    if os.path.exists(out):
        if os.listdir(out) and not os.path.exists(os.path.join(out, "recipe.log")):
            raise SystemExit(f"{recipe}: {out} exists and is not a recipe run; pick another --out")
        shutil.rmtree(out)
    os.makedirs(out)
    return os.path.join(out, "recipe.log")


def recipe_env() -> dict[str, str]:
    """One thread per rank, quiet warnings, this checkout first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=REPO + (os.pathsep + path if path else ""))
