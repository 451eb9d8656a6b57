"""CPU/gloo backend for megatron-core: real TP/SP/PP/EP/DP on gloo ranks of one machine.

megatron-core assumes CUDA throughout. Rather than fork it, this module adapts the few places that
block it on a CPU-only torch (see shared/reference/megatron-core-on-cpu.md for how each was found):

1. `torch.cuda` calls (device, RNG, streams, events, synchronize) get CPU stand-ins;
2. a TorchFunctionMode rewrites CUDA device arguments and `.cuda()` to CPU, and makes
   `Tensor.type()` report the CUDA type name megatron's optimizers compare against;
3. the model-parallel RNG tracker forks the CPU generator (its CUDA-vs-CPU drift check would
   otherwise fire on every fork);
4. gloo adapters: `all_to_all_single` split sizes as int lists, `all_gather` with uneven shapes,
   pipeline p2p through megatron's unbatched path (see `_patch_megatron`);
5. Transformer-Engine-absent fixes: MLA's stale `HAVE_TE`, moe_utils' missing `te_general_gemm`,
   selective recompute's FP8 path switched on by a `fp8 is not None` test.

It is pinned to the megatron-core release it was tested with, switched on only when CUDA is
absent (`activate()` is a no-op otherwise), and nothing outside `k2mcore.parallel` imports it.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_CORE = "0.16.1"
_log = logging.getLogger(__name__)
_state: dict[str, Any] = {"active": False, "mode": None}


def is_active() -> bool:
    return bool(_state["active"])


def activate() -> bool:
    """Switch the backend on if CUDA is absent. Returns whether it is active. Idempotent."""
    if torch.cuda.is_available():
        return False
    if _state["active"]:
        return True
    import megatron.core

    version = getattr(megatron.core, "__version__", "?")
    if version != TESTED_MEGATRON_CORE:
        warnings.warn(
            f"k2mcore's CPU backend was tested with megatron-core {TESTED_MEGATRON_CORE}, "
            f"found {version}"
        )
    _patch_torch_cuda()
    _patch_collectives()
    _patch_megatron()
    mode = _CudaToCpuMode()
    mode.__enter__()  # stays pushed for the life of the process (main thread)
    _state.update(active=True, mode=mode)
    return True


# --------------------------------------------------------------------------------------------
# 1. torch.cuda stand-ins
class _NullStream:
    """Stream/Event stand-in: CPU work is synchronous, so every wait is already satisfied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def wait_stream(self, *a: Any, **k: Any) -> None: ...
    def wait_event(self, *a: Any, **k: Any) -> None: ...
    def record_event(self, *a: Any, **k: Any) -> "_NullStream":
        return _NullStream()

    def record(self, *a: Any, **k: Any) -> None: ...
    def wait(self, *a: Any, **k: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def elapsed_time(self, *a: Any) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cpu_get, cpu_set = torch.get_rng_state, torch.set_rng_state
    stand_ins = {
        # a device, not an index: `device=torch.cuda.current_device()` then needs no rewriting,
        # which matters in autograd's backward, where the TorchFunctionMode below is not active
        "current_device": lambda: torch.device("cpu"),
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "get_rng_state": lambda device="cuda": cpu_get(),
        "set_rng_state": lambda state, device="cuda": cpu_set(state),
        "manual_seed": lambda seed: None,  # the CPU generator is seeded by torch.manual_seed
        "manual_seed_all": lambda seed: None,
        "Stream": _NullStream,
        "Event": _NullStream,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
    }
    for name, fn in stand_ins.items():
        setattr(cuda, name, fn)
    cuda.random.get_rng_state = stand_ins["get_rng_state"]
    cuda.random.set_rng_state = stand_ins["set_rng_state"]


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # an int device means a GPU index


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call megatron makes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        # Fast path first: this runs for every torch op, and most carry no device at all.
        if kwargs:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev):
                kwargs = {**kwargs, "device": "cpu"}
        elif func not in _SPECIAL:
            return func(*args)
        else:
            kwargs = {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers compare param.type() against 'torch.cuda.FloatTensor'.
            return _CUDA_TYPE_NAMES.get(args[0].dtype) or func(*args)
        if func is torch.device and args and _is_cuda_device(args[0]):
            return torch.device("cpu")  # torch.device(0), torch.device("cuda", 0), ...
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_SPECIAL = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.device, torch.Tensor.to})


# --------------------------------------------------------------------------------------------
# 4. gloo adapters
def _patch_collectives() -> None:
    orig_a2a = dist.all_to_all_single
    orig_all_gather = dist.all_gather

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        # gloo needs Python int lists; megatron passes CPU tensors when the counts live on CPU.
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return orig_a2a(output, input, output_split_sizes, input_split_sizes, group, async_op)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        # gloo refuses unequal shapes (megatron's MoE TP+EP path gathers uneven token counts):
        # pad every piece to the largest, gather, then copy the true sizes out.
        if all(t.shape == tensor.shape for t in tensor_list):
            return orig_all_gather(tensor_list, tensor, group, async_op)
        longest = max(t.numel() for t in tensor_list)
        flat = torch.zeros(longest, dtype=tensor.dtype)
        flat[: tensor.numel()] = tensor.reshape(-1)
        bufs = [torch.empty(longest, dtype=tensor.dtype) for _ in tensor_list]
        work = orig_all_gather(bufs, flat, group, False)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[: out.numel()].view(out.shape))
        return work

    dist.all_to_all_single = all_to_all_single
    dist.all_gather = all_gather


# --------------------------------------------------------------------------------------------
# 3 and 5. megatron-core internals
def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401

        return True
    except Exception:  # a half-installed TE raises anything from ImportError to OSError
        return False


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Tracker whose named states are CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # As megatron's fork, minus the "CPU RNG changed" check: here the forked
            # generator *is* the CPU one.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)

    # gloo pairs a batch's sends and receives to one peer in posting order. megatron's batched
    # order (send_prev, recv_prev, send_next, recv_next) then crosses activations and gradients
    # when prev == next (pp=2 with virtual stages). Its unbatched path orders by rank parity and
    # keeps the two directions on separate groups.
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    unbatched = p2p._p2p_ops
    p2p._batched_p2p_ops = lambda **kw: list(unbatched(**kw).values())

    if not _te_importable():
        from megatron.core.transformer import multi_latent_attention as mla
        from megatron.core.transformer.moe import moe_utils

        mla.HAVE_TE = False  # it is True there even without TE (its TE names are MagicMocks)
        for name in ("TELinear", "TEColumnParallelLinear", "Linear"):
            setattr(mla, name, None)
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        # CheckpointWithoutOutput sets `fp8 = fp8 is not None`, so its default False turns the
        # TE FP8 path on, and selective recompute dies on TE's undefined FP8GlobalStateManager.
        cwo = mrandom.CheckpointWithoutOutput
        cwo_init = cwo.__init__

        def _init(self, fp8=False):
            cwo_init(self, fp8)
            self.fp8 = bool(fp8)

        cwo.__init__ = _init
