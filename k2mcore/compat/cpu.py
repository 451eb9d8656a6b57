"""CPU/gloo backend for megatron-core: real TP/SP/PP/EP/DP on gloo ranks of one machine.

megatron-core assumes CUDA throughout. Rather than fork it, this module adapts the few places that
block it on a CPU-only run (docs/reference.md, 'megatron-core on CPU', tells how each was found):

1. `torch.cuda` calls (device, RNG, streams, events, synchronize) get CPU stand-ins;
2. a TorchFunctionMode rewrites CUDA device arguments and `.cuda()` to CPU, drops
   `pin_memory=True` (no driver to pin with), and makes
   `Tensor.type()` report the CUDA type name megatron's optimizers compare against;
3. the model-parallel RNG tracker forks the CPU generator (its CUDA-vs-CPU drift check would
   otherwise fire on every fork);
4. gloo adapters: `all_to_all_single` split sizes as int lists, `all_gather` with uneven shapes
   (one broadcast per rank: no padding),
   pipeline p2p through megatron's unbatched path;
5. Transformer-Engine-absent fixes: selective recompute's FP8 path switched on by a
   `fp8 is not None` test, and its recomputed outputs handed over by a storage copy rather than
   a C++ extension megatron compiles at run time.

Active only when CUDA is absent (`activate()` is a no-op otherwise); nothing outside
`k2mcore.compat` knows about it. Each megatron or torch function it replaces is a declared
`Patch`, checked before it is replaced (k2mcore/compat/patching.py); the `torch.cuda` stand-ins
are set directly, since on a CPU-only torch there is nothing of CUDA's to check.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from k2mcore import platform

from .patching import Patch, apply, companion, declare

_log = logging.getLogger(__name__)
_state: dict[str, Any] = {"active": False, "mode": None}

_RANDOM = "megatron.core.tensor_parallel.random"
_P2P = "megatron.core.pipeline_parallel.p2p_communication"
_P2P_PARAMS = ("tensor_send_prev", "tensor_recv_prev", "tensor_send_next", "tensor_recv_next",
               "group", "prev_pipeline_rank", "next_pipeline_rank")
RNG_TRACKER = declare(Patch(
    "cpu-rng-tracker", f"{_RANDOM}.CudaRNGStatesTracker",
    why="megatron's tracker forks CUDA generators and warns when the CPU one moves inside a fork",
    remove_when="megatron's tracker takes a device (or a CPU-generator mode)"))
RNG_GET = companion(RNG_TRACKER, "cpu-rng-get", f"{_RANDOM}._get_cuda_rng_state",
                    "reads the CUDA generator", params=("device", "clone", "graph_safe"))
RNG_SET = companion(RNG_TRACKER, "cpu-rng-set", f"{_RANDOM}._set_cuda_rng_state",
                    "writes the CUDA generator", params=("new_state", "device", "graph_safe"))
RNG_INIT = companion(RNG_TRACKER, "cpu-rng-init", f"{_RANDOM}.initialize_rng_tracker",
                     "re-created after the tracker class is swapped",
                     params=("use_te_rng_tracker", "inference_rng_tracker",
                             "use_cudagraphable_rng", "force_reset"))
P2P_BATCHED = declare(Patch(
    "cpu-p2p-unbatched", f"{_P2P}._batched_p2p_ops", params=_P2P_PARAMS,
    why="gloo pairs a batch's sends and receives to one peer in posting order, so megatron's "
        "batched order crosses activations and gradients when prev == next (PP2 with VPP)",
    remove_when="megatron orders batched p2p by rank parity, or gloo matches by tag"))
P2P_UNBATCHED = companion(P2P_BATCHED, "cpu-p2p-unbatched-source", f"{_P2P}._p2p_ops",
                          "what cpu-p2p-unbatched calls instead", params=_P2P_PARAMS)
RECOMPUTE_FP8 = declare(Patch(
    "cpu-recompute-fp8", f"{_RANDOM}.CheckpointWithoutOutput.__init__", params=("self", "fp8"),
    why="`self.fp8 = fp8 is not None` turns its TE FP8 path on for fp8=False, and selective "
        "recompute then dies on TE's undefined FP8GlobalStateManager",
    remove_when="megatron tests `fp8` for truth"))
RECOMPUTE_SHARE = declare(Patch(
    "cpu-recompute-share-storage", f"{_RANDOM}._get_share_storage", params=(),
    why="selective recompute compiles a C++ extension (load_inline: g++, ninja, Python headers, "
        "seconds per fresh machine) to point outputs at recomputed storage; on CPU a storage "
        "copy, megatron 0.16.1's way, gives the same tensors",
    remove_when="megatron ships the extension prebuilt or has a Python fallback"))


def is_active() -> bool:
    return bool(_state["active"])


def activate() -> bool:
    """Switch the backend on if CUDA is absent. Returns whether it is active. Idempotent."""
    if platform.has_cuda():
        return False
    if _state["active"]:
        return True
    _patch_torch_cuda()
    _patch_collectives()
    _patch_megatron()
    mode = _CudaToCpuMode()
    mode.__enter__()  # stays pushed for the life of the process (main thread)
    _state.update(active=True, mode=mode)
    return True


@contextlib.contextmanager
def device_mode_suspended() -> Iterator[None]:
    """Pop the device-rewriting mode for a block (bench_layouts measures what it costs)."""
    mode = _state["mode"]
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


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
            if kwargs.get("pin_memory"):
                # pinning asks the CUDA driver for host memory (megatron's CP rope slicing pins
                # its index tensor); without a GPU there is nothing to pin for
                kwargs = {**kwargs, "pin_memory": False}
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
A2A = declare(Patch(
    "cpu-gloo-all-to-all", "torch.distributed.all_to_all_single",
    params=("output", "input", "output_split_sizes", "input_split_sizes", "group", "async_op"),
    why="gloo needs split sizes as Python int lists; megatron passes CPU tensors when the "
        "counts already live on CPU", remove_when="gloo accepts tensor split sizes"))
ALL_GATHER = declare(Patch(
    "cpu-gloo-uneven-all-gather", "torch.distributed.all_gather",
    params=("tensor_list", "tensor", "group", "async_op"),
    why="gloo refuses unequal shapes, and megatron's MoE TP+EP path gathers uneven token counts "
        "(so do MuonClip's owner-aligned shards); run as one broadcast per rank, NCCL's grouped "
        "way, so no padding goes on the wire",
    remove_when="gloo supports uneven all_gather"))


class _AllOf:
    """One handle over several async collectives, so a caller's single `wait()` covers every
    piece of an adapted collective."""

    def __init__(self, works: list, copies: list) -> None:
        self._works, self._copies = works, copies

    def wait(self, timeout: Any = None) -> bool:
        for w in self._works:
            w.wait() if timeout is None else w.wait(timeout)
        for out, buf in self._copies:  # pieces that were not contiguous views
            out.copy_(buf)
        self._works, self._copies = [], []
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)


def _patch_collectives() -> None:
    def a2a(orig):
        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                              group=None, async_op=False):
            if isinstance(output_split_sizes, torch.Tensor):
                output_split_sizes = output_split_sizes.tolist()
            if isinstance(input_split_sizes, torch.Tensor):
                input_split_sizes = input_split_sizes.tolist()
            return orig(output, input, output_split_sizes, input_split_sizes, group, async_op)
        return all_to_all_single

    def gather(orig):
        def all_gather(tensor_list, tensor, group=None, async_op=False):
            if all(t.shape == tensor.shape for t in tensor_list):
                return orig(tensor_list, tensor, group, async_op)
            # Uneven: one broadcast per rank from its own piece, as NCCL's grouped path runs it,
            # so the wire carries each piece's true size (padding to the largest would not).
            me = dist.get_rank(group)
            tensor_list[me].copy_(tensor.view(tensor_list[me].shape))
            works, copies = [], []
            for r, out in enumerate(tensor_list):
                if out.numel() == 0:
                    continue
                buf = out if out.is_contiguous() else out.contiguous()
                if buf is not out:
                    copies.append((out, buf))
                works.append(dist.broadcast(buf, group=group, group_src=r, async_op=True))
            handle = _AllOf(works, copies)
            if async_op:
                return handle
            handle.wait()
            return None
        return all_gather

    apply(A2A, a2a)
    apply(ALL_GATHER, gather)


# --------------------------------------------------------------------------------------------
# 3 and 5. megatron-core internals
def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def cpu_tracker(base: type) -> type:
        class CpuRNGStatesTracker(base):
            """Tracker whose named states are CPU generator states."""

            def add(self, name: str, seed: int) -> None:
                if name in self.states_:
                    raise Exception(f"rng state {name} already exists")
                if seed in self.seeds_:
                    raise Exception(f"seed {seed} already exists")
                self._is_initialized = True
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

        return CpuRNGStatesTracker

    apply(RNG_TRACKER, cpu_tracker)
    apply(RNG_GET, lambda _: lambda *a, **k: torch.get_rng_state())
    apply(RNG_SET, lambda _: lambda state, *a, **k: torch.set_rng_state(state))
    RNG_INIT.check()
    mrandom.initialize_rng_tracker(force_reset=True)

    P2P_UNBATCHED.check()
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    # the unbatched path orders by rank parity and keeps the two directions on separate groups
    apply(P2P_BATCHED, lambda _: lambda **kw: list(p2p._p2p_ops(**kw).values()))

    if not platform.te_importable():
        def fp8_off(init):
            def __init__(self, fp8=False):
                init(self, fp8)
                self.fp8 = bool(fp8)
            return __init__

        apply(RECOMPUTE_FP8, fp8_off)

    def copy_storage(output: torch.Tensor, recomputed: torch.Tensor) -> None:
        # every view of `output` shares its storage, so all of them see the recomputed values
        output.untyped_storage().resize_(recomputed.untyped_storage().size())
        output.untyped_storage().copy_(recomputed.untyped_storage())

    apply(RECOMPUTE_SHARE, lambda _: lambda: copy_storage)
