"""Which platform this process runs on: the one place that asks.

Answers "cuda" or "cpu", the device tensors go to, whether Transformer-Engine can be used and
the default training dtype. It never patches anything: making megatron-core run without CUDA is
the compatibility package's job, and only it knows how.
"""
from __future__ import annotations

import functools

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def kind() -> str:
    """'cuda' or 'cpu'."""
    return "cuda" if has_cuda() else "cpu"


def device() -> torch.device:
    """Where this rank's model, batches and buffers live: its current GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


@functools.lru_cache(maxsize=1)
def te_importable() -> bool:
    """Transformer-Engine's torch extension imports. A half-installed TE raises anything from
    ImportError to OSError (and would break `import megatron.core` too), hence the broad catch."""
    try:
        import transformer_engine.pytorch  # noqa: F401

        return True
    except Exception:
        return False


def te_usable() -> bool:
    """megatron's TE spec is used only with a GPU and an importable TE."""
    return has_cuda() and te_importable()


def default_dtype() -> torch.dtype:
    """train.dtype 'auto': bf16 on GPU, fp32 on CPU (bf16 matmul is ~40x slower on a CPU)."""
    return torch.bfloat16 if has_cuda() else torch.float32
