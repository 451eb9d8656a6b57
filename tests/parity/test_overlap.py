"""Overlapped data-parallel communication (train.overlap_grad_reduce / overlap_param_gather), event
by event (layout_worker.record_overlap: two AdamW steps with the distributed optimizer and
BUCKET-sized buckets, at DP2 and PP2 x VPP2 x DP2): in the second step, the first with megatron's
recorded per-bucket readiness, every bucket of the first stage's first chunk but the last is
reduce-scattered while the backward still runs, every bucket once per step whatever the
micro-batch count, and the parameters are all-gathered during the next forward (in the forward
pre-hooks; with virtual stages, from the interleaved schedule before each chunk's first forward),
never in the optimizer step. Parity with one rank under overlap is every other parity test here:
each of them runs with overlap on."""
from __future__ import annotations

import os

import pytest
import torch
from layout_worker import OVERLAP_LAYOUTS


@pytest.fixture(scope="module")
def overlap_runs(parity_dir) -> dict:
    return {name: torch.load(os.path.join(parity_dir, f"{name}.overlap.pt"), weights_only=False)
            for name in OVERLAP_LAYOUTS}


def _steps(events: list) -> list[list]:
    """The events of each step, from its "begin"."""
    starts = [i for i, e in enumerate(events) if e[0] == "begin"] + [len(events)]
    return [events[a:b] for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS)
def test_buckets_reduce_during_the_backward_once_per_step(overlap_runs, layout):
    for rank, run in enumerate(overlap_runs[layout]):
        assert run["micro_batches"] >= 2  # no_sync: one reduce per bucket, not per micro-batch
        buckets = run["buckets"]
        first = [b for c, b in buckets if c == 0]
        if run["pp_rank"] == 0:
            assert len(first) >= 2, (rank, buckets)  # megatron buckets stage 0, chunk 0 only
        else:
            assert len(first) == 1, (rank, buckets)
        for step, events in enumerate(_steps(run["events"])):
            issued = [e[1:] for e in events if e[0] == "rs"]
            assert sorted(issued) == sorted(buckets), (rank, step, issued)
        events = _steps(run["events"])[1]
        last_grad = max(i for i, e in enumerate(events) if e[0] == "grad")
        finalize = next(i for i, e in enumerate(events) if e[0] == "finalize")
        order = [(i, e[1:]) for i, e in enumerate(events) if e[0] == "rs" and e[1] == 0]
        assert len(order) == len(first)
        for i, bucket in order[:-1]:  # all but the last bucket issued
            assert i < last_grad and i < finalize, (rank, bucket, i, last_grad, finalize)
            # issued by its last gradient's accumulation: megatron's hook on that accumulator
            # runs before the recording one, so exactly one of its "grad" events follows
            after = [j for j, e in enumerate(events) if e[0] == "grad" and e[1:] == bucket
                     and j > i]
            assert len(after) == 1, (rank, bucket, i, after)


@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS)
def test_parameters_gather_in_the_next_forward_not_in_the_step(overlap_runs, layout):
    for rank, run in enumerate(overlap_runs[layout]):
        steps = _steps(run["events"])
        for step, events in enumerate(steps):
            gathered = [e[1:3] for e in events if e[0] == "ag"]
            assert sorted(gathered) == sorted(run["buckets"]), (rank, step, gathered)
            finalize = next(i for i, e in enumerate(events) if e[0] == "finalize")
            ags = [i for i, e in enumerate(events) if e[0] == "ag"]
            assert max(ags) < finalize, (rank, step)  # none in the optimizer step
            if "vpp" not in layout:
                assert all(e[3] for e in events if e[0] == "ag"), (rank, step)  # pre-hooks
        # the second step gathers the first step's update before its first backward ends
        events = steps[1]
        first_grad = next(i for i, e in enumerate(events) if e[0] == "grad")
        chunk0 = [i for i, e in enumerate(events) if e[0] == "ag" and e[1] == 0]
        assert max(chunk0) < first_grad or run["pp_rank"] != 0, rank
