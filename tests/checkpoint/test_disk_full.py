"""A checkpoint save that runs out of disk: one line naming the path, exit 2, the previous
checkpoint intact and still the newest, and no partial directory left (the space comes back).

The checkpoint directory is a small tmpfs, which takes root to mount (CI runs as root). Without
root the test skips with one line; as root a failing mount is a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from harness.launching import local_env
from k2mcore.checkpoint.format import latest_checkpoint, validate_checkpoint

K2M_TRAIN = os.path.join(os.path.dirname(sys.executable), "k2m-train")
# a k2-tiny checkpoint with AdamW state at 1 rank is about 7 MB: one fits, two do not
TMPFS_MB = 11
ARGS = ["--config", "k2-tiny", "--set", "train.global_batch_size=4", "--set",
        "train.seq_length=32", "--set", "optimizer.name=adamw", "--set", "train.iters=4",
        "--set", "checkpoint.interval=2", "--set", "logging.tensorboard=false"]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting the small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"mount failed as root: {proc.stderr.strip()}"
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_stops_the_run_in_one_line_and_leaves_no_debris(small_disk, tmp_path,
                                                                     async_save):
    """Also when the background writer of an async save hits the full disk: its failure stops
    the run at the poll or wait that finds it."""
    ckpt = os.path.join(small_disk, "ckpt")
    proc = subprocess.run([sys.executable, K2M_TRAIN, *ARGS, "--set", f"run.dir={tmp_path / 'run'}",
                           "--set", f"checkpoint.dir={ckpt}",
                           "--set", f"checkpoint.async_save={str(async_save).lower()}"],
                          env=local_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("k2m-train: error: "), err
    first, second = os.path.join(ckpt, "step_00000002"), os.path.join(ckpt, "step_00000004")
    assert f"{second}: save failed" in err[0] and "no space left on the device" in err[0], err[0]
    assert f"newest complete checkpoint is still {first}" in err[0], err[0]
    # nothing of the failed save is left, and the space it took is free again
    assert sorted(os.listdir(ckpt)) == ["step_00000002"]
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    total, _, free = shutil.disk_usage(small_disk)
    assert free >= total - used - (1 << 20), (total, used, free)
    # the previous checkpoint is whole (every file's size and CRC32) and still the newest
    assert latest_checkpoint(ckpt) == first
    assert validate_checkpoint(first)["step"] == 2
