"""A real Slurm cluster on this machine for the tests: Debian's slurmctld, three slurmd "nodes"
(n1, n2, n3 on 127.0.0.2-4) and munged, brought up once per test session and stopped by
PID at the end (see docs/reference.md, 'Slurm on one machine', for why each setting is there).

`ensure_installed()` installs the packages with apt when they are missing; without root or apt
the tests skip with one line, unless K2M_REQUIRE_SLURM=1 (CI) turns that into a failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
# a 2-node job and a spare, as on a real cluster: the job requeued after losing a node runs on
# the spare at once. (Observed with two nodes: a rerun placed on the restarted node got SIGTERM
# about KillWait later and failed, as if slurmctld's terminate-job for the lost run, queued
# while the node was down, reached the rerun of the same job id.)
NODES = {"n1": ("127.0.0.2", 17001), "n2": ("127.0.0.3", 17002), "n3": ("127.0.0.4", 17003)}
CTLD_PORT = 16817
# scontrol/sinfo/sbatch read the cluster from SLURM_CONF; every test command gets it
CONF_ENV = "SLURM_CONF"

CONFIG = """\
ClusterName=k2mtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again cred_expire + 1 s after it ended (default 120, minimum 5)
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
# no cgroups and no systemd in CI containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# a node whose slurmd stops answering is DOWN after 10 s; it returns when slurmd is back
SlurmdTimeout=10
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=30
SchedulerParameters=sched_interval=2,bf_interval=2
# preemption by partition priority, requeueing the preempted job after it got its --signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
{nodes}
PartitionName=batch Nodes=ALL Default=YES PriorityTier=1 GraceTime=10 MaxTime=INFINITE State=UP
PartitionName=urgent Nodes=ALL PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(Exception):
    """No root or no apt: the cluster cannot be brought up here (one line)."""


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")


@dataclass
class Cluster:
    root: str
    conf: str
    pids: dict = field(default_factory=dict)  # daemon name -> pid (munged, slurmctld, n1, n2)

    def env(self, **extra: str) -> dict:
        return dict(os.environ, **{CONF_ENV: self.conf}, **extra)

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its key=value fields."""
        out = self.run("scontrol", "show", "-o", "job", job_id)
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def job_nodes(self, job_id: str) -> list[str]:
        """The nodes a job runs on, expanded (`n[1-2]` -> n1, n2), batch host first."""
        return self.run("scontrol", "show", "hostnames", self.job(job_id)["NodeList"]).split()

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-n", node, "-o", "%T").strip()

    def wait(self, what: str, test, timeout: float = 120, every: float = 0.5):
        end = time.time() + timeout
        while time.time() < end:
            value = test()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"Slurm test cluster: {what} after {timeout:.0f} s")

    def start_slurmd(self, node: str) -> None:
        # a killed slurmd leaves its pid file: the new one's pid must not be read from it
        pidfile = os.path.join(self.root, f"slurmd-{node}.pid")
        if os.path.exists(pidfile):
            os.remove(pidfile)
        subprocess.run(["slurmd", "-f", self.conf, "-N", node], env=self.env(), check=True,
                       capture_output=True, timeout=60)
        self.pids[node] = self._pid_from(f"slurmd-{node}.pid")

    def kill_node(self, node: str) -> list[int]:
        """What a crashed machine does to its slurmd and to that node's job processes:
        SIGKILL, no goodbye. Returns the job processes' PIDs."""
        import psutil

        pid = self.pids.pop(node)
        victims = {p for p in _pids() if _environ(p).get("SLURMD_NODENAME") == node}
        # the node's slurmstepd (the tasks' parent, detached from slurmd): left alive it would
        # report the tasks' deaths, which a crashed machine cannot
        for p in list(victims):
            try:
                parent = psutil.Process(p).parent()
            except psutil.NoSuchProcess:
                continue
            if parent is not None and parent.name().startswith("slurmstepd"):
                victims.add(parent.pid)
        try:
            victims |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        victims = sorted(victims)
        for p in [pid, *victims]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    def _pid_from(self, name: str, timeout: float = 15) -> int:
        path = os.path.join(self.root, name)
        self.wait(f"no {path}", lambda: os.path.exists(path) and open(path).read().strip(),
                  timeout=timeout, every=0.1)
        return int(open(path).read().strip())

    def stop(self) -> None:
        """Every daemon this cluster started, by PID, slurmd first, munged last."""
        order = [n for n in NODES if n in self.pids] + ["slurmctld", "munged"]
        for name in order:
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            end = time.time() + 10
            while time.time() < end and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        # anything still running with this cluster's configuration was missed: say so
        left = [p for p in _pids() if self.conf in _cmdline(p) and _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        if left:
            raise RuntimeError(f"Slurm test cluster: {len(left)} daemon(s) outlived stop(): "
                               f"{[_cmdline(p) for p in left]}")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> dict:
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return {}
    return dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a daemon's zombie is gone as far as the cluster is concerned


def start(root: str) -> Cluster:
    """Write the configuration under `root`, start munged, slurmctld and both slurmd, and wait
    until both nodes are idle."""
    ensure_installed()
    os.makedirs(os.path.join(root, "state"), exist_ok=True)
    for node in NODES:
        os.makedirs(os.path.join(root, "spool", node), exist_ok=True)
    nodes = "\n".join(f"NodeName={n} NodeAddr={a} Port={p} CPUs=1 RealMemory=1000"
                      for n, (a, p) in NODES.items())
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(CONFIG.format(root=root, ctld_port=CTLD_PORT, nodes=nodes))
    cluster = Cluster(root=root, conf=conf)
    try:
        _start_munge(cluster)
        subprocess.run(["slurmctld", "-c", "-f", conf], env=cluster.env(), check=True,
                       capture_output=True, timeout=60)
        cluster.pids["slurmctld"] = cluster._pid_from("slurmctld.pid")
        for node in NODES:
            cluster.start_slurmd(node)
        cluster.wait("nodes not idle", lambda: all(
            cluster.node_state(n).startswith("idle") for n in NODES), timeout=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_munge(cluster: Cluster) -> None:
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):
        subprocess.run(["mungekey", "--create"], check=True, capture_output=True, timeout=60)
        shutil.chown(key, "munge", "munge")
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
    pidfile = "/run/munge/munged.pid"
    if os.path.exists(pidfile):
        old = int(open(pidfile).read().strip() or 0)
        if old and _alive(old):
            return  # a munged already runs (not ours: leave it)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True,
                   capture_output=True, timeout=60)
    cluster.pids["munged"] = cluster.wait(
        "munged did not start", lambda: os.path.exists(pidfile) and int(open(pidfile).read()),
        timeout=15, every=0.1)


def skip_or_fail(reason: str) -> None:
    """pytest.skip with one line, or a failure where the cluster is required (CI)."""
    import pytest

    if os.environ.get("K2M_REQUIRE_SLURM") == "1":
        pytest.fail(f"K2M_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def maybe_start(root: str) -> Optional[Cluster]:
    try:
        return start(root)
    except SlurmUnavailable as exc:
        skip_or_fail(str(exc))
    return None
