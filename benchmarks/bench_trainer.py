"""The trainer's figures: step time per layout, checkpoint save/load against a plain copy of the
same bytes, and the time from SIGTERM to a completed save.

    python benchmarks/bench_trainer.py

Every figure comes from `k2m-train` runs on this machine in this invocation; ranks share its
cores, so compare ratios within one run, not across machines.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from launching import local_command, local_env  # noqa: E402  (shared with the tests)

BIN = os.path.dirname(sys.executable)
K2M_TRAIN = os.path.join(BIN, "k2m-train")
COMMON = ["--config", "k2-tiny", "--set", "logging.tensorboard=false", "--set",
          "optimizer.name=adamw"]
LAYOUTS = {
    "1rank": (1, []),
    "dp2-zero1": (2, []),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2-ep2": (2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]),
    "tp2-pp2-ep2": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sp=true"]),
}
# a wider model than k2-tiny so the checkpoint has megabytes to move
WIDE = ["model.hidden_size=256", "model.ffn_hidden_size=1024", "model.moe_ffn_hidden_size=256",
        "model.num_experts=16"]


def _cmd(nproc: int, sets: list[str]) -> list[str]:
    args = list(COMMON)
    for s in sets:
        args += ["--set", s]
    return local_command(nproc, K2M_TRAIN, args)


_env = local_env


def _rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_times(work: str) -> dict[str, float]:
    out = {}
    for name, (nproc, sets) in LAYOUTS.items():
        run = os.path.join(work, name)
        subprocess.run(_cmd(nproc, sets + ["train.iters=12", f"run.dir={run}"]), env=_env(),
                       check=True, capture_output=True)
        speeds = [r["tokens_per_s"] for r in _rows(run)[2:]]  # two warm-up steps
        tokens = 8 * 64
        out[name] = tokens / statistics.median(speeds)
    return out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def checkpoint_io(work: str) -> dict[str, float]:
    """Save (interval at the last step) and load (resume, 0 steps left) of the wide model."""
    run = os.path.join(work, "ckpt")
    sets = WIDE + ["train.iters=2", "checkpoint.interval=2", f"run.dir={run}"]
    proc = subprocess.run(_cmd(1, sets), env=_env(), check=True, capture_output=True, text=True)
    save_s = float(proc.stdout.split("saved checkpoint")[1].split(" in ")[1].split(" s")[0])
    ckpt = os.path.join(run, "checkpoints", "step_00000002")
    size = _dir_bytes(ckpt)
    copy_dst = os.path.join(work, "copy")
    start = time.perf_counter()
    shutil.copytree(ckpt, copy_dst)
    os.sync()
    copy_s = time.perf_counter() - start
    # loading: resume with nothing left to train; the loop reports the load's own time
    proc = subprocess.run(_cmd(1, WIDE + ["train.iters=2", f"run.dir={run}"]), env=_env(),
                          check=True, capture_output=True, text=True)
    load_s = float(proc.stdout.split("resumed from")[1].split(" in ")[1].split(" s")[0])
    mb = size / 2**20
    return {"MB": mb, "save_MBps": mb / save_s, "load_MBps": mb / load_s,
            "copy_MBps": mb / copy_s}


def sigterm_to_save(work: str) -> float:
    run = os.path.join(work, "sigterm")
    proc = subprocess.Popen(_cmd(1, WIDE + ["train.iters=1000", f"run.dir={run}"]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    path = os.path.join(run, "metrics.jsonl")
    while not (os.path.exists(path) and len(_rows(run)) >= 3):
        time.sleep(0.1)
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    return time.perf_counter() - start


def main() -> None:
    work = tempfile.mkdtemp(prefix="k2m-bench-")
    try:
        steps = step_times(work)
        base = steps["1rank"]
        print("k2-tiny training step (fwd+bwd+AdamW), global batch 8 x 64, median of 10")
        print(f"{'layout':14s} {'ranks':>5s} {'ms/step':>9s} {'vs 1 rank':>9s}")
        for name, t in steps.items():
            print(f"{name:14s} {LAYOUTS[name][0]:5d} {t * 1e3:9.1f} {t / base:9.2f}x")
        io = checkpoint_io(work)
        print(f"checkpoint of a wider model ({io['MB']:.1f} MB, model + AdamW state): "
              f"save {io['save_MBps']:.0f} MB/s, load {io['load_MBps']:.0f} MB/s, plain copy "
              f"{io['copy_MBps']:.0f} MB/s -> save {io['save_MBps'] / io['copy_MBps']:.2f}x, "
              f"load {io['load_MBps'] / io['copy_MBps']:.2f}x of the copy")
        print(f"SIGTERM to a completed save and exit 0: {sigterm_to_save(work):.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
