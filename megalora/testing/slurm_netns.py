"""A real multi-host SLURM on one machine for tests: each host is a network namespace.

    with NetnsSlurm(workdir, hosts=2) as cluster:        # root, iproute2, slurm-wlm, munge
        job = cluster.sbatch(["--nodes=2", "launch/sbatch.sh", "umm_tiny"], env=...)
        cluster.wait(job)

What it builds (everything named after this process's id, so runs do not collide):
- a bridge in the root namespace holding 10.213.N.1/24, the controller's address;
- per host ``mlN-hK``: a network namespace with a veth pair on the bridge (10.213.N.(10+K)),
  loopback up, its own hostname (a UTS namespace) and, in a private mount namespace, its own
  /etc/hosts naming every host (/etc/netns/<ns>/hosts bound over it) and
  ``workdir/hosts/<host>`` bound on ``workdir/node``, so each slurmd has its own spool, pid and
  log files under the same configured paths;
- one munged (or the running one), one slurmctld in the root namespace on the bridge address,
  one slurmd per host (slurm.conf: NodeName/NodeAddr per host).
Every job step runs inside its host's namespaces: its traffic to the other host crosses the
bridge, and nothing leaves the addresses the fixture made. ``stop`` kills every process left in
each namespace, stops the daemons by pid, deletes the namespaces, the bridge and the hosts
files, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import List, Optional

from megalora.distributed import free_port
from megalora.testing.slurm_local import CONF, LocalSlurm, missing as local_missing, read_pid

_TOOLS = ("ip", "nsenter", "unshare", "mount", "getent")


def missing() -> Optional[str]:
    """Why a namespace cluster cannot run here (None when it can)."""
    why = local_missing()
    if why:
        return why
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 util-linux)"
    probe = f"mlprobe{os.getpid() % 100000}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"cannot create network namespaces: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _subnet() -> int:
    """A 10.213.N.0/24 no interface of this machine uses."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    for offset in range(200):
        n = 20 + (os.getpid() + offset) % 200
        if f" 10.213.{n}." not in used:
            return n
    raise RuntimeError("no free 10.213.N.0/24 subnet for the test hosts")


class NetnsSlurm(LocalSlurm):
    def __init__(self, workdir: str, hosts: int = 2, cpus: int = 2, memory_mb: int = 8000):
        super().__init__(workdir, cpus=cpus, memory_mb=memory_mb)
        tag = os.getpid() % 100000
        self.net = _subnet()
        self.bridge = f"mlbr{tag}"
        self.names = [f"mlnode{k + 1}" for k in range(hosts)]
        self.netns = {h: f"ml{tag}-h{k + 1}" for k, h in enumerate(self.names)}
        self.addr = {h: f"10.213.{self.net}.{11 + k}" for k, h in enumerate(self.names)}
        self.ctl_addr = f"10.213.{self.net}.1"
        self.made: List[str] = []  # what exists, for stop()

    # -- the hosts ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        self._make_network()
        for host in self.names:
            os.makedirs(os.path.join(self.dir, "hosts", host, "spool"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "node"), exist_ok=True)
        super().start(timeout)

    def _ip(self, *args: str, ns: Optional[str] = None) -> None:
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")

    def _make_network(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        self._ip("addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for k, host in enumerate(self.names):
            ns, veth = self.netns[host], f"{self.bridge}v{k + 1}"
            self._ip("netns", "add", ns)
            self.made.append(ns)
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("link", "set", veth, "master", self.bridge, "up")
            self._ip("addr", "add", f"{self.addr[host]}/24", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "up", ns=ns)
            self._ip("link", "set", "lo", "up", ns=ns)
            self.write_hosts(host, self.names)

    def write_hosts(self, host: str, names: List[str]) -> None:
        """``host``'s /etc/hosts: localhost, the controller and ``names`` (in place: a running
        namespace sees the change)."""
        folder = f"/etc/netns/{self.netns[host]}"
        os.makedirs(folder, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{self.ctl_addr} {self.host}"]
        lines += [f"{self.addr[n]} {n}" for n in names]
        with open(os.path.join(folder, "hosts"), "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def on_host(self, host: str, cmd: List[str]) -> List[str]:
        """``cmd`` as it runs on ``host``: in its network, hostname and private mounts (its
        /etc/hosts, its slurmd folder). nsenter, not ``ip netns exec``: that remounts /sys,
        hiding the cgroup mounts slurmd needs."""
        script = ('mount --bind "$1" /etc/hosts && mount --bind "$2" "$3" && hostname "$4" '
                  '&& shift 4 && exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns[host]}", "unshare", "--uts",
                "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                f"/etc/netns/{self.netns[host]}/hosts", os.path.join(self.dir, "hosts", host),
                os.path.join(self.dir, "node"), host, *cmd]

    def conf_text(self) -> str:
        conf = CONF.format(host=self.host, cpus=self.cpus, memory=self.memory, dir=self.dir,
                           ctld_port=free_port(), slurmd_port=free_port())
        node = os.path.join(self.dir, "node")
        lines = []
        for line in conf.splitlines():
            key = line.split("=", 1)[0]
            if key == "SlurmctldHost":
                line = f"SlurmctldHost={self.host}({self.ctl_addr})"
            elif key in ("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile"):
                leaf = {"SlurmdSpoolDir": "spool", "SlurmdPidFile": "slurmd.pid",
                        "SlurmdLogFile": "slurmd.log"}[key]
                line = f"{key}={node}/{leaf}"
            elif key in ("NodeName", "PartitionName"):
                continue
            lines.append(line)
        # a host that stops answering is marked down after 10 s, not SLURM's 300
        lines.append("SlurmdTimeout=10")
        lines += [f"NodeName={h} NodeAddr={self.addr[h]} CPUs={self.cpus} "
                  f"RealMemory={self.memory} State=UNKNOWN" for h in self.names]
        lines.append(f"PartitionName=debug Nodes={','.join(self.names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def start_slurmd(self, timeout: float) -> None:
        for host in self.names:
            pid_file = os.path.join(self.dir, "hosts", host, "slurmd.pid")
            if os.path.exists(pid_file):
                os.remove(pid_file)
            out = subprocess.run(self.on_host(host, ["slurmd"]), env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"slurmd on {host} failed to start: {out.stderr}")
            self.pids[f"slurmd@{host}"] = read_pid(pid_file, timeout)

    # -- failures ----------------------------------------------------------------------------
    def kill_host(self, host: str) -> List[int]:
        """Every process in ``host``'s network namespace killed at once (SIGKILL), as a host
        that loses power; returns their pids."""
        out = subprocess.run(["ip", "netns", "pids", self.netns[host]], capture_output=True,
                             text=True)
        pids = [int(p) for p in out.stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.pop(f"slurmd@{host}", None)
        return pids

    # -- teardown ----------------------------------------------------------------------------
    def stop(self) -> None:
        for host in self.names:  # job steps and anything else left in the hosts first
            if self.netns[host] in self.made:
                self.kill_host(host)
        super().stop()
        for name in reversed(self.made):
            if name == "bridge":
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        self.made.clear()
        time.sleep(0.2)  # the kernel frees the veth pairs with their namespaces
