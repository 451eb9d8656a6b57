"""The project's own slurm/train.sbatch on a real Slurm cluster (tests/harness/slurm_cluster.py:
Debian's slurmctld and three slurmd "nodes" on loopback): k2-tiny on 2 nodes x 2 ranks, the job
preempted by a higher-priority partition, requeued from outside with `scontrol requeue`, and one
node lost with its job processes; every time Slurm requeues the job exactly once, the rerun resumes
from the newest complete checkpoint, and the final losses equal an uninterrupted run's at the same
OMP_NUM_THREADS, bit for bit.

One job goes through the three interruptions in turn (each costs a requeue delay and a restart
of four ranks: a job per scenario would triple that); each test checks its own part of the
record the `interrupted_job` fixture keeps.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from harness import slurm_cluster
from harness.launching import free_port, local_command, local_env

BIN = os.path.dirname(sys.executable)
K2M_TRAIN = os.path.join(BIN, "k2m-train")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "slurm", "train.sbatch")
ITERS, INTERVAL = 24, 3
ARGS = ["--config", "k2-tiny", "--set", "train.global_batch_size=4", "--set",
        "train.seq_length=32", "--set", "optimizer.name=adamw", "--set", "optimizer.lr=2e-3",
        "--set", "optimizer.warmup_iters=2", "--set", f"optimizer.decay_iters={ITERS}",
        "--set", "train.seed=77", "--set", f"train.iters={ITERS}",
        "--set", f"checkpoint.interval={INTERVAL}", "--set", "parallel.ep=2",
        "--set", "parallel.pp=2", "--set", "logging.tensorboard=false"]
THREADS = "1"  # the job's and the reference's: the thread count changes fp32 sums


def _rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip()]


def _losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("slurm"))
    c = slurm_cluster.maybe_start(root)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same 4 ranks uninterrupted (torchrun on this machine), started first so that it runs
    while the cluster installs and the job waits on Slurm (requeue delays, the node timeout)."""
    run = str(tmp_path_factory.mktemp("slurm-ref"))
    cmd = local_command(4, K2M_TRAIN, [*ARGS, "--set", f"run.dir={run}"])
    proc = subprocess.Popen(cmd, env=local_env(OMP_NUM_THREADS=THREADS), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    yield run, proc
    if proc.poll() is None:  # a test failed before the reference was read: torchrun and ranks
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    run, proc = reference_run
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return _losses(run)


class Job:
    def __init__(self, cluster, run_dir: str, out: str, job_id: str):
        self.cluster, self.run_dir, self.out, self.id = cluster, run_dir, out, job_id

    def info(self) -> dict:
        return self.cluster.job(self.id)

    def state(self) -> str:
        return self.info().get("JobState", "")

    def restarts(self) -> int:
        return int(self.info().get("Restarts", "0"))

    def log(self) -> str:
        return open(self.out).read() if os.path.exists(self.out) else ""

    def wait_running_past(self, step: int, restarts: int, timeout: float = 300) -> int:
        """Wait until run `restarts` of the job has logged a step > `step`; return it."""
        def ready():
            if self.restarts() != restarts or self.state() != "RUNNING":
                return None
            rows = _rows(self.run_dir)
            return rows[-1]["step"] if rows and rows[-1]["step"] > step else None
        return self.cluster.wait(f"job {self.id} run {restarts} past step {step}", ready,
                                 timeout=timeout)

    def wait_requeued(self, restarts: int, timeout: float = 300) -> None:
        self.cluster.wait(f"job {self.id} requeued ({restarts} restarts)",
                          lambda: self.restarts() >= restarts, timeout=timeout)


def _resumed_at(log: str, step: int) -> bool:
    """The trainer's banner of a run that resumed from the checkpoint of `step`."""
    return re.search(rf"resumed from \S+ at step {step} in ", log) is not None


def _saved_steps(run_dir: str) -> list[int]:
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(n.split("_")[1]) for n in os.listdir(d) if n.startswith("step_"))


@pytest.fixture(scope="module")
def interrupted_job(reference_run, cluster, tmp_path_factory) -> dict:
    """Submit the job; preempt it, requeue it, lose a node under it; let it finish."""
    tmp = str(tmp_path_factory.mktemp("slurm-job"))
    run_dir, out = os.path.join(tmp, "run"), os.path.join(tmp, "job.out")
    # every "node" is this machine: the rendezvous host is a loopback address, not n1's name
    env = cluster.env(PATH=local_env()["PATH"], GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), RUN_DIR=run_dir, K2M_TRAIN=K2M_TRAIN,
                      OMP_NUM_THREADS=THREADS, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--partition=batch", "--signal=B:USR1@600", f"--output={out}", "--job-name=k2m-slurm",
         SBATCH, *ARGS], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = Job(cluster, run_dir, out, proc.stdout.strip().split(";")[0])
    record: dict = {"job": job}
    t0 = time.time()

    def mark(what: str) -> None:  # the timeline, printed when a test fails
        print(f"slurm test: {time.time() - t0:6.1f} s {what}")
    try:
        # 1. preemption: a job in the higher-priority partition wants one of the job's nodes
        record["preempted_after"] = job.wait_running_past(INTERVAL, 0)
        wanted = cluster.job_nodes(job.id)[-1]
        mark("preempting")
        urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--nodes=1",
                             f"--nodelist={wanted}", "--gpus-per-node=0",
                             f"--output={tmp}/urgent.out", "--wrap=sleep 1").strip()
        job.wait_requeued(1)
        job.wait_running_past(0, 1)
        record["urgent"] = cluster.job(urgent)
        record["saved_1"] = _saved_steps(run_dir)
        # 2. external requeue
        record["requeued_after"] = job.wait_running_past(record["saved_1"][-1] + INTERVAL, 1)
        mark("scontrol requeue")
        cluster.run("scontrol", "requeue", job.id)
        job.wait_requeued(2)
        # the ranks may still be saving when the restart count moves: read the checkpoints
        # once the next run is under way
        job.wait_running_past(0, 2)
        record["saved_2"] = _saved_steps(run_dir)
        # 3. node loss: a node's slurmd and its job processes die at once (not the batch host's)
        record["lost_after"] = job.wait_running_past(record["saved_2"][-1] + INTERVAL, 2)
        lost = record["lost"] = cluster.job_nodes(job.id)[-1]
        mark("killing a node")
        record["killed"] = cluster.kill_node(lost)
        cluster.wait(f"{lost} marked down", lambda: "down" in cluster.node_state(lost),
                     timeout=120)
        record["down_state"] = cluster.node_state(lost)
        job.wait_requeued(3)
        job.wait_running_past(0, 3)  # on the other two nodes
        record["saved_3"] = _saved_steps(run_dir)
        record["rerun_nodes"] = cluster.job_nodes(job.id)
        mark("node back")
        cluster.start_slurmd(lost)  # the machine is back
        cluster.wait(f"{lost} back in service", lambda: cluster.node_state(lost) == "idle",
                     timeout=120)
        cluster.wait(f"job {job.id} completed",
                     lambda: job.state() in ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
        mark("completed")
        time.sleep(2)  # let the last run's restart count settle in scontrol's record
        record["final"] = job.info()
    finally:
        if "final" not in record:
            cluster.run("scancel", job.id, check=False)
            print(job.log()[-4000:])
    record["log"] = job.log()
    return record


def test_preemption_signal_save_requeue_resume(interrupted_job):
    r, log = interrupted_job, interrupted_job["log"]
    assert "preemption notice" in log  # Slurm's --signal reached the batch script
    assert f"requeueing job {r['job'].id}" in log  # the script's requeue, the only one
    assert r["saved_1"] and r["saved_1"][-1] >= r["preempted_after"]  # saved on the way out
    assert r["urgent"]["JobState"] in ("COMPLETED", "RUNNING", "COMPLETING")
    assert _resumed_at(log, r["saved_1"][-1])  # the rerun resumed from it


def test_external_requeue_resumes(interrupted_job):
    r, log = interrupted_job, interrupted_job["log"]
    assert r["saved_2"][-1] >= r["requeued_after"]
    assert _resumed_at(log, r["saved_2"][-1])


def test_node_loss_requeues_and_resumes_from_the_newest_checkpoint(interrupted_job):
    r, log = interrupted_job, interrupted_job["log"]
    assert r["killed"], f"no job process ran on {r['lost']}"
    assert "down" in r["down_state"]
    assert r["lost"] not in r["rerun_nodes"]
    newest = r["saved_3"][-1]
    assert r["saved_2"][-1] <= newest <= r["lost_after"]
    assert _resumed_at(log, newest)


def test_job_ran_exactly_once_per_interruption_and_matches_the_reference(interrupted_job,
                                                                         reference):
    final = interrupted_job["final"]
    assert final["JobState"] == "COMPLETED", final
    assert final["Restarts"] == "3", final  # one rerun per interruption, no more
    assert final["ExitCode"] == "0:0"
    job = interrupted_job["job"]
    losses = _losses(job.run_dir)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert losses == reference  # same ranks, same threads: bit for bit


def test_run_dir_from_the_arguments_is_the_one_the_stop_file_goes_to(tmp_path):
    """No cluster: `srun`, `scontrol` and `torchrun` stand-ins (srun runs its command, torchrun
    records its arguments). A `--set run.dir=DIR` in the job's arguments wins over RUN_DIR, so the
    directory the script makes and writes its stop file into is the ranks' run.dir (k2m-train
    takes the last override, the script's own); without one, RUN_DIR is used."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'SLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in ("srun", "torchrun", "scontrol"):
        (bin_dir / tool).chmod(0o755)

    def job(args: list[str], run_dir_env: str) -> tuple[str, list[str]]:
        record = tmp_path / "srun.args"
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SRUN_ARGS=str(record),
                   RUN_DIR=run_dir_env, SLURM_JOB_ID="7", SLURM_NNODES="1",
                   SLURM_JOB_NODELIST="node1", K2M_TRAIN="k2m-train")
        proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "train.sbatch"), *args],
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return record.read_text().splitlines(), sorted(p.name for p in tmp_path.iterdir())

    wanted, env_dir = str(tmp_path / "wanted"), str(tmp_path / "from_env")
    args, made = job(["--config", "k2-tiny", "--set", f"run.dir={wanted}"], env_dir)
    assert args[-2:] == ["--set", f"run.dir={wanted}"] and "wanted" in made
    assert "from_env" not in made
    args, made = job(["--config", "k2-tiny"], env_dir)
    assert args[-2:] == ["--set", f"run.dir={env_dir}"] and "from_env" in made
