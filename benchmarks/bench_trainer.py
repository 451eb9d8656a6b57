"""The trainer's figures: step time per layout, checkpoint save/load against a durable copy of
the same files (read, write, fsync, one process per rank's files), and the time from SIGTERM to
a completed save.

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
# the checkpoint of issue 18's figures: k2-tiny widened (hidden 512, 8 experts, 4 layers) with
# AdamW state (about 310 MB); saved and loaded at 1 rank and at DP2 x EP2 on 4 ranks
WIDE = ["model.hidden_size=512", "model.ffn_hidden_size=2048", "model.moe_ffn_hidden_size=512",
        "model.num_experts=8"]
IO_LAYOUTS = {"1rank": (1, []), "dp2-ep2": (4, ["parallel.ep=2"])}

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


def _durable_copy(files: list[str], src: str, dst: str) -> None:
    """What a save at disk speed would do with these bytes: read each file, write it, fsync it
    (k2mcore's writer fsyncs every file), then fsync the directories."""
    dirs = set()
    for rel in files:
        out = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(os.path.join(src, rel), "rb") as fi, open(out, "wb") as fo:
            shutil.copyfileobj(fi, fo, 16 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        dirs.add(os.path.dirname(out))
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _copy_in_parallel(ckpt: str, dst: str, nproc: int) -> float:
    """`nproc` copy processes at once, one per rank's files (DCP's `__<rank>_*.distcp`; the
    small shared files go with rank 0's); seconds until the last one is done."""
    files = sorted(os.path.relpath(os.path.join(d, f), ckpt)
                   for d, _, fs in os.walk(ckpt) for f in fs)
    mine = {r: [] for r in range(nproc)}
    for rel in files:
        name = os.path.basename(rel)
        rank = int(name[2:].split("_")[0]) if name.startswith("__") else 0
        mine[rank % nproc].append(rel)
    code = ("import json, sys; sys.path.insert(0, %r); from bench_trainer import _durable_copy; "
            "_durable_copy(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3])"
            % os.path.dirname(os.path.abspath(__file__)))
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(mine[r]), ckpt, dst])
             for r in range(nproc)]
    for p in procs:
        assert p.wait() == 0
    return time.perf_counter() - start


def checkpoint_io(work: str, name: str) -> dict[str, float]:
    """Save (interval at the last step) and load (resume, 0 steps left) of the wide model at a
    layout, against durable copies of the same files, one process per rank."""
    nproc, layout = IO_LAYOUTS[name]
    run = os.path.join(work, f"ckpt-{name}")
    sets = WIDE + layout + ["train.iters=2", "checkpoint.interval=2", f"run.dir={run}"]
    proc = subprocess.run(_cmd(nproc, sets), env=_env(), check=True, capture_output=True,
                          text=True)
    save_s = float(proc.stdout.split("saved checkpoint")[1].split(" in ")[1].split(" s")[0])
    ckpt = os.path.join(run, "checkpoints", "step_00000002")
    mb = _dir_bytes(ckpt) / 2**20
    os.sync()
    copy_s = _copy_in_parallel(ckpt, os.path.join(work, f"copy-{name}"), nproc)
    shutil.rmtree(os.path.join(work, f"copy-{name}"))
    # loading: resume for one more step (a finished run would not load); the loop reports the
    # load's own time
    proc = subprocess.run(_cmd(nproc, WIDE + layout + ["train.iters=3", f"run.dir={run}"]),
                          env=_env(), check=True, capture_output=True, text=True)
    load_s = float(proc.stdout.split("resumed from")[1].split(" in ")[1].split(" s")[0])
    shutil.rmtree(run)
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
        for name in IO_LAYOUTS:
            io = checkpoint_io(work, name)
            print(f"checkpoint at {name} ({io['MB']:.0f} MB, model + AdamW state): save "
                  f"{io['save_MBps']:.0f} MB/s, load {io['load_MBps']:.0f} MB/s; a durable copy "
                  f"(read, write, fsync; one process per rank) {io['copy_MBps']:.0f} MB/s -> "
                  f"save {io['save_MBps'] / io['copy_MBps']:.2f}x, load "
                  f"{io['load_MBps'] / io['copy_MBps']:.2f}x of the copy")
        print(f"SIGTERM to a completed save and exit 0: {sigterm_to_save(work):.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
