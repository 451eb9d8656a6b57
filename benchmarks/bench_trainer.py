"""The trainer's figures: step time per layout; checkpoint save, load and async save against a
durable copy of the same files (read, write, fsync, one process per rank's files), the stall of
the step that starts an async save; and the time from SIGTERM to a completed save and exit 0.

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
from harness.launching import local_command, local_env  # noqa: E402  (shared with the tests)

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


def _read_all(path: str) -> None:
    """Read every file under path once (into the page cache: the copies' source at its
    fastest)."""
    for d, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fi:
                while fi.read(16 << 20):
                    pass


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


def _saves(stdout: str) -> list[float]:
    """Seconds of each "saved checkpoint ... in X s" line (from save() to the commit)."""
    return [float(line.rsplit(" in ", 1)[1].split(" s")[0]) for line in stdout.splitlines()
            if line.startswith("saved checkpoint")]


def checkpoint_io(work: str, name: str) -> dict[str, float]:
    """At a layout: synchronous saves (steps 2, 4, ..., 10: the first one also computes the
    save plan; the median of the other four), a load (resume for one more step), async saves
    (steps 2, 4, 6) with the stall of the saving step, each against a durable copy of the same
    files, one process per rank (the median of three copies)."""
    nproc, layout = IO_LAYOUTS[name]
    run = os.path.join(work, f"ckpt-{name}")
    sets = WIDE + layout + ["checkpoint.interval=2", "checkpoint.keep=1", f"run.dir={run}"]
    proc = subprocess.run(_cmd(nproc, sets + ["train.iters=10"]), env=_env(), check=True,
                          capture_output=True, text=True)
    first_s, *later = _saves(proc.stdout)
    save_s = statistics.median(later)
    ckpt = os.path.join(run, "checkpoints", "step_00000010")
    mb = _dir_bytes(ckpt) / 2**20
    _read_all(ckpt)  # the save wrote around the page cache: every copy reads from it instead
    copies = []
    for _ in range(3):  # the copy's speed varies most from try to try: the median of three
        os.sync()
        copies.append(_copy_in_parallel(ckpt, os.path.join(work, f"copy-{name}"), nproc))
        shutil.rmtree(os.path.join(work, f"copy-{name}"))
    copy_s = statistics.median(copies)
    # loading: resume for one more step (a finished run would not load); the loop reports the
    # load's own time
    proc = subprocess.run(_cmd(nproc, sets + ["train.iters=11"]), env=_env(), check=True,
                          capture_output=True, text=True)
    load_s = float(proc.stdout.split("resumed from")[1].split(" in ")[1].split(" s")[0])
    shutil.rmtree(run)
    # async: saves at steps 2, 4, 6 of 8; the stall is the saving step's time plus the time the
    # save held the loop, against the median step that neither saves nor overlaps a write
    proc = subprocess.run(_cmd(nproc, sets + ["train.iters=8", "checkpoint.async_save=true"]),
                          env=_env(), check=True, capture_output=True, text=True)
    blocked = [float(line.split("copied in ")[1].split(" s")[0])
               for line in proc.stdout.splitlines() if "writing in the background" in line]
    async_s = _saves(proc.stdout)
    steps = {r["step"]: 8 * 64 / r["tokens_per_s"] for r in _rows(run)}
    quiet = statistics.median([steps[s] for s in (2, 3) if s in steps] + [steps[8]])
    shutil.rmtree(run)
    return {"MB": mb, "save_MBps": mb / save_s, "first_save_MBps": mb / first_s,
            "load_MBps": mb / load_s, "copy_MBps": mb / copy_s,
            "async_MBps": mb / async_s[1], "stall": (steps[4] + blocked[1]) / quiet,
            "blocked_s": blocked[1], "overlap": steps[5] / quiet}


def sigterm_to_save(work: str) -> float:
    """Seconds from SIGTERM to exit 0 at 4 ranks (DP2 x EP2), async saves every 2 steps: the
    signal can land while one is being written, which the stop's synchronous save finishes
    first."""
    nproc, layout = IO_LAYOUTS["dp2-ep2"]
    run = os.path.join(work, "sigterm")
    sets = WIDE + layout + ["train.iters=1000", "checkpoint.interval=2",
                            "checkpoint.async_save=true", f"run.dir={run}"]
    proc = subprocess.Popen(_cmd(nproc, sets), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    path = os.path.join(run, "metrics.jsonl")
    while not (os.path.exists(path) and len(_rows(run)) >= 5):
        time.sleep(0.1)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-f", run], capture_output=True,
                                            text=True).stdout.split() if int(p) != proc.pid]
    start = time.perf_counter()
    for pid in ranks:  # as Slurm signals a job step's tasks (torchrun itself would abort)
        os.kill(pid, signal.SIGTERM)
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
            copy = io["copy_MBps"]
            print(f"checkpoint at {name} ({io['MB']:.0f} MB, model + AdamW state); a durable "
                  f"copy of its files (read, write, fsync; one process per rank) {copy:.0f} MB/s")
            for what, key in (("save", "save_MBps"), ("first save of a run", "first_save_MBps"),
                              ("load", "load_MBps"), ("async save, to its commit", "async_MBps")):
                print(f"  {what:28s} {io[key]:7.0f} MB/s  {io[key] / copy:5.2f}x the copy")
            print(f"  the step that starts an async save: {io['stall']:.2f}x a quiet step (the "
                  f"save held it {io['blocked_s']:.2f} s); the next step, with the write under "
                  f"way: {io['overlap']:.2f}x")
        print(f"SIGTERM to a completed save and exit 0 (dp2-ep2, async saves every 2 steps): "
              f"{sigterm_to_save(work):.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
