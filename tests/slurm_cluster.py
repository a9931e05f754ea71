"""A real one-node Slurm cluster on loopback for the tests: munged, slurmctld and slurmd
with a minimal slurm.conf in a temp dir, each in its own process group.

Nothing is installed here: `make test` installs the Debian packages (slurmctld slurmd
slurm-client munge) when `sbatch` is missing; without them the tests skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dino_scale.engine.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_reason() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return (f"Slurm not installed ({', '.join(missing)} missing): `make test` installs slurmctld "
                "slurmd slurm-client munge with apt-get where it can")
    if os.geteuid() != 0:
        return "a local slurmd must run as root (SlurmdUser=root) and this is not root"
    return None


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    procs: list[subprocess.Popen]

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(env or {}), **self.env})
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once purged."""
        out = self.run("scontrol", "show", "-o", "job", job_id, check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self) -> None:
        """Cancel what is left (its slurmstepd outlive slurmd otherwise), then the daemons."""
        if all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 60
                while self.run("squeue", "-h", "-o", "%i", check=False).split() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start_cluster(root: Path, cpus: int = 2) -> SlurmCluster:
    """munged + slurmctld + slurmd (foreground, each its own session) for node `hostname -s`."""
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge.sock"
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=dinotest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        # a requeued job may start again cred_expire + 1 s later (default 120)
        f"AuthInfo=socket={sock},cred_expire=5",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        # containers: no cgroups
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        # schedule every 2 s (default 60): a requeued job starts again within seconds
        "SchedulerParameters=sched_interval=2,bf_interval=1",
        "JobRequeue=1", "ReturnToService=2", "MpiDefault=none", "SwitchType=switch/none",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = root / "log"
    commands = [
        [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
         f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={logs / 'munged.log'}",
         f"--seed-file={root / 'munge.seed'}"],
        [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
        [_which("slurmd"), "-D", "-f", str(conf)],
    ]
    cluster = SlurmCluster(root, conf, [])
    try:
        for cmd in commands:
            out = open(logs / f"{Path(cmd[0]).name}.stdout", "wb")
            cluster.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            if Path(cmd[0]).name == "munged":
                _wait(lambda: sock.exists(), 10, "munged socket", cluster)
        _wait(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%T", check=False), 30, "node idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(ok, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((cluster.root / "log").glob("*")))
            raise RuntimeError(f"local Slurm: no {what} ({'exited: ' + str(dead) if dead else 'timeout'})\n{logs}")
        time.sleep(0.2)
