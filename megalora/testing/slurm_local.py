"""A real one-node SLURM on localhost for tests (Debian's slurm-wlm + munge, run as root).

    with LocalSlurm(workdir, cpus=2) as cluster:
        job = cluster.sbatch(["launch/sbatch.sh", "umm_tiny"], env=...)
        cluster.wait(job, "COMPLETED")

Everything lives in ``workdir`` except munge's key and socket (munged insists on owning them
under /etc/munge and /run/munge). munged, slurmctld and slurmd are started here and stopped by
the process ids in their pid files on exit, whatever happened. What mattered, from
shared/notes/slurm_localhost.md: no cgroup.conf (slurmd 22.05 will not start with
``CgroupPlugin=disabled``), linuxproc process tracking, wait for the node to be ``idle``.
A requeued job waits for its old step credentials to expire before it starts again (SLURM's
default 120 s; ``cred_expire=15`` here; starting it earlier fails with "Job credential
revoked").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

from megalora.distributed import free_port

MUNGE_KEY = "/etc/munge/munge.key"

CONF = """\
ClusterName=megalora
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=15
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
KillWait=30
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> Optional[str]:
    """Why a local SLURM cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "not root (slurmd and munged need root)"
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install slurm-wlm munge)"
    return None


class LocalSlurm:
    def __init__(self, workdir: str, cpus: int = 2, memory_mb: int = 20000):
        self.dir = os.path.abspath(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.cpus, self.memory = cpus, memory_mb
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.pids: Dict[str, int] = {}
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    # -- daemons -----------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(self.conf, "w") as fh:
            fh.write(self.conf_text())
        for name in ("slurmctld.pid", "slurmd.pid"):  # stale ones would be read as ours
            if os.path.exists(os.path.join(self.dir, name)):
                os.remove(os.path.join(self.dir, name))
        self._start_munge()
        self._run(["slurmctld"])
        self.pids["slurmctld"] = read_pid(os.path.join(self.dir, "slurmctld.pid"), timeout)
        self.start_slurmd(timeout)
        self.wait_idle(timeout)

    def conf_text(self) -> str:
        return CONF.format(host=self.host, cpus=self.cpus, memory=self.memory, dir=self.dir,
                           ctld_port=free_port(), slurmd_port=free_port())

    def start_slurmd(self, timeout: float) -> None:
        self._run(["slurmd"])
        self.pids["slurmd"] = read_pid(os.path.join(self.dir, "slurmd.pid"), timeout)

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is already running (system service): use it, do not stop it
        if not os.path.isfile(MUNGE_KEY):
            os.makedirs(os.path.dirname(MUNGE_KEY), exist_ok=True)
            with open(MUNGE_KEY, "wb") as fh:
                fh.write(os.urandom(1024))
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run(["chown", "-R", "munge:munge", "/etc/munge", "/run/munge"], check=True)
        os.chmod("/etc/munge", 0o700)
        os.chmod(MUNGE_KEY, 0o400)
        pid_file = "/run/munge/munged.pid"
        if os.path.exists(pid_file):
            os.remove(pid_file)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=60)
        self.pids["munged"] = read_pid(pid_file, 30)
        out = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"munge does not work: {out.stdout}{out.stderr}")

    def wait_idle(self, timeout: float) -> None:
        """Until every node is idle."""
        deadline = time.time() + timeout
        states = []
        while time.time() < deadline:
            states = self._run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            if states and all(state == "idle" for state in states):
                return
            time.sleep(1)
        raise TimeoutError(f"SLURM nodes not idle after {timeout:.0f} s (states {states}); "
                           f"see the slurmd and slurmctld logs under {self.dir}")

    def stop(self) -> None:
        """Stop what this object started, by process id (the slurmds, slurmctld, then
        munged)."""
        order = sorted(self.pids, key=lambda n: (not n.startswith("slurmd"), n == "munged"))
        for name in order:
            stop_pid(self.pids.pop(name))

    # -- jobs --------------------------------------------------------------------------------
    def _run(self, cmd: List[str], check: bool = True, env: Optional[dict] = None,
             timeout: float = 60.0):
        out = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}")
        return out

    def sbatch(self, args: List[str], env: Optional[dict] = None, cwd: Optional[str] = None
               ) -> str:
        # the job inherits exactly ``env`` (sbatch exports the submitter's environment): not
        # merged with ours, so variables the caller left out (MASTER_PORT...) stay out
        job_env = {**env, "SLURM_CONF": self.conf} if env is not None else self.env
        out = subprocess.run(["sbatch", "--parsable", *args], env=job_env,
                             capture_output=True, text=True, timeout=60, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ...)."""
        text = self._run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, states=("COMPLETED",), timeout: float = 600.0,
             until=None) -> Dict[str, str]:
        """Poll until the job is in one of ``states`` (or ``until(info)`` is true); a job that
        ends in another final state raises with its state."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        deadline = time.time() + timeout
        info: Dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states or (until is not None and until(info)):
                return info
            if state in final:
                raise RuntimeError(f"job {job_id} ended {state} (reason {info.get('Reason')})")
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")


def stop_pid(pid: int, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and alive(pid):
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def read_pid(path: str, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
