"""What megatron-core reads once, at its import, set before that import happens.

megatron-core 0.19.2 wraps functions in `torch.compile` when its modules load
(`megatron.core.jit.jit_fuser`). Without CUDA that costs every process seconds: the router's
expert-bias update (moe/router.py `_apply_expert_bias`, run every step of an aux-loss-free MoE)
is compiled by inductor to C++ on its first call and again on its second, and importing inductor
for it takes about 2 s more. On a 2-core machine that was 5 of the 13 s of a 1-rank k2-tiny run,
for an element-wise update whose speed does not matter on CPU. `TORCHDYNAMO_DISABLE=1`, read by
`torch.compile` when it decorates, leaves those functions as written (same losses, bit for bit).

That has to happen before `import megatron`, whoever imports it first. `install()` (run by
`import k2mcore`, which imports neither torch nor megatron) puts a finder first on
`sys.meta_path`; on the first import of a `megatron` module it removes itself and calls
`before_megatron()`. So no entry point or worker has to remember to, and a process that never
imports megatron (the planner) never imports torch either.
"""
from __future__ import annotations

import os
import sys


class _FirstMegatronImport:
    """A meta path finder that finds nothing: it only notices the first megatron import."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            uninstall()
            before_megatron()
        return None


_FINDER = _FirstMegatronImport()


def install() -> None:
    """Arrange for `before_megatron()` to run before megatron-core is first imported."""
    if "megatron" in sys.modules or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def before_megatron() -> None:
    """The console filters always (megatron's import-time notices); without CUDA, megatron's
    torch.compile'd functions left eager (an explicit TORCHDYNAMO_DISABLE is respected)."""
    from k2mcore import platform

    from . import console

    console.install()
    if not platform.has_cuda():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
