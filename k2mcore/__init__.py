"""k2mcore: a megatron-core 3D-parallel trainer for Kimi-K2-class MoE models."""
from __future__ import annotations

__version__ = "0.1.0"

# before megatron-core is imported, by whichever module first does: see compat/preimport.py
from k2mcore.compat import preimport as _preimport  # noqa: E402

_preimport.install()


def load_model(path: str, device: str = "cpu"):
    """Load a Hugging Face DeepseekV3/Kimi-K2 directory; see k2mcore.model.load.load_model."""
    from k2mcore.model.load import load_model as _load

    return _load(path, device=device)


__all__ = ["load_model", "__version__"]
