"""The CPU backend (k2mcore.compat.cpu): what it stands in for, its gloo adapters, and that it
is inert with CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2mcore.compat import cpu as cpu_backend


def test_stand_ins_on_cpu():
    assert cpu_backend.activate() is True and cpu_backend.is_active()
    x = torch.empty(3, device="cuda")  # megatron's hard-coded placements land on CPU
    assert x.device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    # megatron's optimizers refuse anything but these type names
    assert torch.nn.Parameter(torch.ones(2)).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64  # conversions untouched
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    cpu_backend.activate()
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0,
                                            force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(7)
    outside = torch.rand(3)
    torch.manual_seed(7)
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream is restored untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advances between forks
    # the same seed gives the same tracked stream (what makes TP-sharded init reproducible)
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0,
                                            force_reset_rng=True)
    with mrandom.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)


def _gloo_worker(rank: int, world: int, path: str) -> None:
    cpu_backend.activate()
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    # uneven all_gather: rank r contributes r+1 rows
    mine = torch.full((rank + 1, 2), float(rank))
    out = [torch.empty(r + 1, 2) for r in range(world)]
    dist.all_gather(out, mine)
    for r, t in enumerate(out):
        assert torch.equal(t, torch.full((r + 1, 2), float(r))), (rank, r, t)
    # all_to_all_single with split sizes given as tensors, as megatron's MoE dispatcher does
    send = torch.arange(3, dtype=torch.float32) + 10 * rank  # rank 0 sends [1 | 2] elements
    in_splits = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])
    out_splits = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])
    recv = torch.empty(int(out_splits.sum()))
    dist.all_to_all_single(recv, send, out_splits, in_splits)
    want = torch.tensor([0.0, 10.0, 11.0]) if rank == 0 else torch.tensor([1.0, 2.0, 12.0])
    assert torch.equal(recv, want), (rank, recv)
    dist.destroy_process_group()


def test_gloo_adapters(tmp_path):
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_inert_when_cuda_is_present():
    """With CUDA available, activate() changes nothing (checked in a fresh interpreter)."""
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        torch.cuda.is_available = lambda: True
        before = (torch.cuda.current_device, dist.all_gather, dist.all_to_all_single)
        from megatron.core.tensor_parallel import random as mrandom
        tracker = mrandom.CudaRNGStatesTracker
        from k2mcore.compat import cpu as cpu_backend
        assert cpu_backend.activate() is False and not cpu_backend.is_active()
        from k2mcore import compat
        compat.install()  # the platform entry point: on CUDA only the console filters
        assert compat.applied() == [], compat.applied()
        after = (torch.cuda.current_device, dist.all_gather, dist.all_to_all_single)
        assert before == after and mrandom.CudaRNGStatesTracker is tracker
        from torch.overrides import _get_current_function_mode_stack
        assert not _get_current_function_mode_stack()
        print("inert")
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "inert" in out.stdout, out.stderr[-2000:]
