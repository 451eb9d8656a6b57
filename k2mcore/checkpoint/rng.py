"""A rank's random-number generator states as JSON: python's, numpy's, torch's CPU generator,
the CUDA generators (on a real GPU) and megatron's CUDA RNG tracker.

JSON rather than a pickle or torch.save, so a checkpoint's RNG files are plain data. Restoring
them only makes sense at the layout they were saved at (k2mcore.checkpoint.manager decides).
"""
from __future__ import annotations

import base64
import random

import numpy as np
import torch

from k2mcore import platform


def rng_state() -> dict:
    """This process's generator states."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    tracker = {}
    for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        # CUDA generator objects (megatron's graph-safe tracker) hold their state in get_state()
        tracker[name] = _b64(st.get_state() if isinstance(st, torch.Generator) else st)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": _b64(torch.get_rng_state()),
        # only on a real GPU are there CUDA generators of their own
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if platform.has_cuda() else None,
        "tracker": tracker,
    }


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` returned."""
    from megatron.core import tensor_parallel

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"],
                         "gauss": n["gauss"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and platform.has_cuda():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    restored = {}
    for name, text in state["tracker"].items():
        if isinstance(current.get(name), torch.Generator):
            current[name].set_state(_unb64(text))
            restored[name] = current[name]
        else:
            restored[name] = _unb64(text)
    tracker.set_states(restored)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()
