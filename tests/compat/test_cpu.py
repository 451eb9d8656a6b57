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


ROWS = (2, 0, 3)  # rank r's rows in the uneven all_gather (rank 1 contributes none)


def _gloo_worker(rank: int, world: int, path: str) -> None:
    cpu_backend.activate()
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    # what goes on the wire: every broadcast the adapter issues, (source, bytes)
    sent, broadcast = [], dist.broadcast

    def recording(tensor, *args, **kwargs):
        sent.append((kwargs.get("group_src"), tensor.numel() * tensor.element_size()))
        return broadcast(tensor, *args, **kwargs)

    dist.broadcast = recording
    try:
        def mine(step):
            return torch.full((ROWS[rank], 2), float(10 * step + rank))

        def expect(outs, step):
            for r, t in enumerate(outs):
                assert torch.equal(t, torch.full((ROWS[r], 2), float(10 * step + r))), (rank, r, t)

        # synchronous, into separate tensors
        out = [torch.empty(n, 2) for n in ROWS]
        assert dist.all_gather(out, mine(0)) is None
        expect(out, 0)
        # async, into views of one flat buffer (as compat.uneven_shards hands it): one handle
        flat = torch.empty(sum(ROWS) * 2)
        views = list(torch.split(flat, [2 * n for n in ROWS]))
        work = dist.all_gather([v.view(-1, 2) for v in views], mine(1), async_op=True)
        work.wait()
        expect([v.view(-1, 2) for v in views], 1)
        # async into strided pieces (every other column of one matrix): filled by wait()
        wide = torch.full((sum(ROWS), 4), -1.0)
        starts = [sum(ROWS[:r]) for r in range(world)]
        pieces = [wide[s:s + n, ::2] for s, n in zip(starts, ROWS)]
        dist.all_gather(pieces, mine(2), async_op=True).wait()
        expect(pieces, 2)
        assert torch.equal(wide[:, 1::2], torch.full((sum(ROWS), 2), -1.0))
    finally:
        dist.broadcast = broadcast
    # no padding: one broadcast per contributing rank, of exactly its piece, per gather
    piece = {r: 4 * 2 * n for r, n in enumerate(ROWS) if n}
    assert sent == [(r, b) for r, b in piece.items()] * 3, (rank, sent)
    _uneven_shards_under_coalescing(rank, world)
    # all_to_all_single with split sizes given as tensors, as megatron's MoE dispatcher does:
    # rank r sends j + 1 elements to rank j
    send = torch.arange(6, dtype=torch.float32) + 10 * rank
    in_splits = torch.tensor([1, 2, 3])
    out_splits = torch.tensor([rank + 1] * world)
    recv = torch.empty(int(out_splits.sum()))
    dist.all_to_all_single(recv, send, out_splits, in_splits)
    first = rank * (rank + 1) // 2
    want = torch.cat([torch.arange(first, first + rank + 1, dtype=torch.float32) + 10 * s
                      for s in range(world)])
    assert torch.equal(recv, want), (rank, recv)
    dist.destroy_process_group()


def _uneven_shards_under_coalescing(rank: int, world: int) -> None:
    """compat.uneven_shards' collectives as overlapped DDP issues them: async, inside megatron's
    `_coalescing_manager`, whose handle megatron keeps; the pieces' Work must be in it."""
    from types import SimpleNamespace

    from megatron.core.distributed import param_and_grad_buffer as pgb

    from k2mcore.compat import uneven_shards

    bounds = [(0, 2), (2, 2), (2, 5)]  # rank 1 holds none of the bucket
    grad = torch.arange(5.0) + 100 * rank
    param = torch.zeros(5)
    uneven_shards.register(SimpleNamespace(grad_data=grad, param_data=param), bounds)
    s, e = bounds[rank]
    shard = pgb.shard_buffer(grad, world)[rank]
    with pgb._coalescing_manager(None, async_ops=True) as cm:
        pgb.dist_reduce_scatter_func(shard, grad, group=None, async_op=True)
    assert len(cm.works) == 1, cm.works  # the list-form reduce-scatter's Work, not dropped
    cm.wait()
    want = torch.arange(5.0)[s:e] * world + 100 * sum(range(world))
    assert torch.equal(shard, want), (rank, shard, want)
    param[s:e] = shard
    with pgb._coalescing_manager(None, async_ops=True) as cm:
        pgb.dist_all_gather_func(param, param[s:e].clone(), group=None, async_op=True)
    assert len(cm.works) == 1, cm.works
    cm.wait()
    assert torch.equal(param, torch.arange(5.0) * world + 100 * sum(range(world))), (rank, param)


def test_gloo_adapters(tmp_path):
    """Three gloo ranks: the uneven all_gather's values (sync, async with one handle) and the
    bytes it puts on the wire (each piece's own size, no padding); compat.uneven_shards' async
    collectives under megatron's coalescing manager; tensor split sizes."""
    mp.spawn(_gloo_worker, args=(3, str(tmp_path / "store")), nprocs=3, join=True)


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
