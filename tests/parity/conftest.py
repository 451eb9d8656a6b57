"""The layout-parity launches, shared by the gradient and the MuonClip parity tests.

Four launches: the 1-rank reference (which also fixes the initial weights), one 2-rank launch
running nine layouts in turn, one 8-rank launch (TP2 x PP2 x EP2 with DP2, TP2 x CP2 x EP2) and
one 4-rank launch (DP4 and four CP layouts). For each layout the worker runs one
forward/backward (1 rank, TP2+SP and PP2 also the same conversations unpacked and packed), then
(all but GRADS_ONLY) 5 MuonClip steps, then (CLIP_LAYOUTS) a QK-Clip-only step, then (layouts
without TP) one counted step of MuonClip and of AdamW, then (PLAN_LAYOUTS) the planner's
measurements (plan_worker.py), then (1 rank, CP4) a 4,096-token pass (cp_probe.py); see
layout_worker.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from cp_probe import RUNS as CP_PROBE_RUNS
from replay_probe import RUNS as REPLAY_RUNS
from rl_probe import RUNS as RL_RUNS
from sync_probe import RUNS as SYNC_RUNS
from layout_worker import (
    ALL,
    BYTE_LAYOUTS,
    CLIP_LAYOUTS,
    EIGHT_RANK,
    EXTRA_FOUR_RANK,
    FOUR_RANK,
    MUONCLIP,
    TWO_RANK,
)

from harness.launching import launch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "layout_worker.py")


def _launch(out: str, layouts: list[str], nproc: int, *extra: str) -> None:
    launch(WORKER, ["--out", out, "--layouts", ",".join(layouts), *extra], nproc,
           what=" ".join(layouts), timeout=1500)


@pytest.fixture(scope="session")
def parity_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("parity"))
    _launch(out, ["1rank"], 1, "--write-init")
    _launch(out, TWO_RANK, 2)
    _launch(out, EIGHT_RANK, 8)
    _launch(out, FOUR_RANK + EXTRA_FOUR_RANK, 4)
    return out


def _load(out: str, name: str) -> dict:
    return torch.load(os.path.join(out, name), weights_only=True)


@pytest.fixture(scope="session")
def results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.pt") for name in ALL}


@pytest.fixture(scope="session")
def muonclip_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.muonclip.pt") for name in MUONCLIP}


@pytest.fixture(scope="session")
def byte_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.bytes.pt") for name in BYTE_LAYOUTS}


@pytest.fixture(scope="session")
def cp_probe_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.cp_saved.pt") for name in CP_PROBE_RUNS}


@pytest.fixture(scope="session")
def clip_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.clip.pt") for name in CLIP_LAYOUTS}


@pytest.fixture(scope="session")
def rl_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.rl.pt") for name in RL_RUNS}


@pytest.fixture(scope="session")
def init_weights(parity_dir) -> dict:
    return _load(parity_dir, "init.pt")


@pytest.fixture(scope="session")
def replay_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.replay.pt") for name in REPLAY_RUNS}


@pytest.fixture(scope="session")
def sync_results(parity_dir) -> dict:
    return {name: _load(parity_dir, f"{name}.sync.pt") for name in SYNC_RUNS}
