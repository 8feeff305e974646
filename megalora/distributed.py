"""One entry for every launcher: ``megalora.distributed.init()``.

``detect()`` reads the environment of the launcher that started this process and returns a
``DistEnv`` (rank, local rank, world size, node, master address and port):

- **torchrun** (also torchrun started by srun, one per node): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` as torchrun sets them.
- **MPI** (``mpiexec``/``mpirun``: MPICH/Intel MPI ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``,
  Open MPI ``OMPI_COMM_WORLD_*``, PMIx ``PMIX_RANK``): the rendezvous address is rank 0's host
  and a free port there, broadcast with mpi4py unless ``MASTER_ADDR``/``MASTER_PORT`` are set.
  Checked before SLURM because mpirun inside an allocation inherits the batch step's SLURM_*.
- **SLURM** (a task of ``srun``, one per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, the per-node task counts (``2(x3),1`` form) and the step's
  node list (compressed form such as ``gpu[01-04,07]``, expanded by python-hostlist, or by
  ``scontrol show hostnames`` when it is missing); the master is the list's first node, the
  port ``MASTER_PORT`` or 20000 + job id mod 20000 (distinct for jobs sharing a node).
- **none**: one process.

Variables that contradict each other (rank >= world size, a node list shorter than the node
count, world size not divisible by TP x PP, more tasks on a node than GPUs) raise
``LaunchError`` naming the variables and what to change. ``init()`` then exports the torch
rendezvous variables and calls ``init_process_group`` (nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional

import torch
import torch.distributed as dist

from megalora.errors import UsageError


class LaunchError(UsageError, RuntimeError):
    """The launcher's environment is missing or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    source: str
    """``torchrun``, ``mpi``, ``slurm``, ``none`` or ``existing`` (a process group was already
    initialised by the caller)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def describe(self) -> str:
        return (f"{self.source}: rank {self.rank}/{self.world_size}, local rank "
                f"{self.local_rank}/{self.local_world_size} on node {self.node_rank}/"
                f"{self.num_nodes}, rendezvous {self.master_addr}:{self.master_port}")


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    value = env.get(name)
    if value is None:
        raise LaunchError(f"{source}: {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{source}: {name}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str, scontrol: Optional[Callable[[str], List[str]]] = None
                    ) -> List[str]:
    """``gpu[01-04,07],cpu1`` -> host names, in order."""
    try:
        import hostlist
    except ImportError:
        return (scontrol or _scontrol_hostnames)(nodelist)
    try:
        return hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise LaunchError(f"SLURM node list {nodelist!r} cannot be parsed: {exc}") from None


def _scontrol_hostnames(nodelist: str) -> List[str]:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot expand SLURM node list {nodelist!r}: install python-hostlist "
                          f"or put scontrol on PATH ({exc})") from None
    return out.split()


def expand_tasks_per_node(spec: str) -> List[int]:
    """SLURM's ``SLURM_STEP_TASKS_PER_NODE`` form: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"SLURM tasks-per-node {spec!r} cannot be parsed")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _check(env: DistEnv, names: str) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{env.source}: rank {env.rank} is outside world size "
                          f"{env.world_size} ({names}); the launcher's variables disagree")
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(f"{env.source}: local rank {env.local_rank} is outside the "
                          f"{env.local_world_size} processes on this node ({names})")
    if not 0 <= env.node_rank < env.num_nodes:
        raise LaunchError(f"{env.source}: node {env.node_rank} is outside the {env.num_nodes} "
                          f"nodes ({names})")
    if env.local_world_size > env.world_size:
        raise LaunchError(f"{env.source}: {env.local_world_size} processes on this node but "
                          f"world size {env.world_size} ({names})")
    return env


def _torchrun(env: Mapping[str, str]) -> DistEnv:
    names = "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE"
    world = _int(env, "WORLD_SIZE", "torchrun")
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise LaunchError("RANK is set but MASTER_ADDR/MASTER_PORT are not: start the job with "
                          "torchrun (which sets both) or export them")
    return _check(DistEnv("torchrun", _int(env, "RANK", "torchrun"), world,
                          _int(env, "LOCAL_RANK", "torchrun"), local_world,
                          int(env.get("GROUP_RANK", _int(env, "RANK", "torchrun") // local_world)),
                          max(1, world // local_world), env["MASTER_ADDR"],
                          _int(env, "MASTER_PORT", "torchrun")), names)


_MPI_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "OMPI_COMM_WORLD_LOCAL_SIZE"),
             ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
             ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"))


def _is_mpi(env: Mapping[str, str]) -> bool:
    return any(v[0] in env for v in _MPI_VARS)


def _mpi(env: Mapping[str, str], rendezvous: Optional[Callable] = None) -> DistEnv:
    rank_v, size_v, lrank_v, lsize_v = next(v for v in _MPI_VARS if v[0] in env)
    rank = _int(env, rank_v, "MPI")
    world = _int(env, size_v, "MPI") if size_v in env else None
    local = _int(env, lrank_v, "MPI") if lrank_v in env else None
    local_world = _int(env, lsize_v, "MPI") if lsize_v in env else None
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world is None or local is None or local_world is None or not (addr and port):
        # ask MPI itself: sizes, this node's ranks and rank 0's address (one broadcast)
        info = (rendezvous or _mpi_rendezvous)(addr, port)
        world = info["world_size"] if world is None else world
        local = info["local_rank"] if local is None else local
        local_world = info["local_world_size"] if local_world is None else local_world
        addr, port = info["master_addr"], info["master_port"]
    nodes = max(1, world // local_world)
    return _check(DistEnv("mpi", rank, world, local, local_world, rank // local_world, nodes,
                          addr, int(port)), f"{rank_v}, {size_v}, {lrank_v}, {lsize_v}")


def free_port() -> int:
    """A TCP port free on every interface of this host now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous(addr: Optional[str], port: Optional[str]) -> dict:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("started by mpiexec/mpirun but mpi4py is not installed: "
                          "`pip install mpi4py` (and mpich, or use your cluster's MPI), or "
                          "export MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    mine = (addr or socket.getfqdn(), int(port) if port else free_port())
    addr, port = comm.bcast(mine if comm.Get_rank() == 0 else None, root=0)
    return {"world_size": comm.Get_size(), "local_rank": node.Get_rank(),
            "local_world_size": node.Get_size(), "master_addr": addr, "master_port": port}


def _slurm(env: Mapping[str, str], scontrol=None) -> DistEnv:
    names = "SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NODELIST"
    rank, world = _int(env, "SLURM_PROCID", "SLURM"), _int(env, "SLURM_NTASKS", "SLURM")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    hosts = expand_nodelist(nodelist, scontrol)
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if len(hosts) != nnodes:
        raise LaunchError(f"SLURM: node list {nodelist!r} has {len(hosts)} hosts but the step "
                          f"has {nnodes} nodes (SLURM_STEP_NUM_NODES/SLURM_NNODES)")
    node = _int(env, "SLURM_NODEID", "SLURM")
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else [world // nnodes] * nnodes
    if len(per_node) != nnodes or sum(per_node) != world:
        raise LaunchError(f"SLURM: tasks per node {per_node_spec!r} ({sum(per_node)} tasks on "
                          f"{len(per_node)} nodes) disagree with SLURM_NTASKS={world} on "
                          f"{nnodes} nodes")
    if node >= nnodes:
        raise LaunchError(f"SLURM: SLURM_NODEID={node} but the step has {nnodes} nodes")
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env and world > 1:
        raise LaunchError(f"SLURM: this is the batch script of a {world}-task job, not a task: "
                          "start the processes with srun (launch/srun.sh) or torchrun "
                          "(launch/sbatch.sh)")
    port = int(env.get("MASTER_PORT") or 20000 + _int(env, "SLURM_JOB_ID", "SLURM") % 20000)
    return _check(DistEnv("slurm", rank, world, _int(env, "SLURM_LOCALID", "SLURM"),
                          per_node[node], node, nnodes, env.get("MASTER_ADDR") or hosts[0],
                          port), names)


def detect(environ: Optional[Mapping[str, str]] = None, *, mpi_rendezvous=None,
           scontrol=None) -> DistEnv:
    """The launcher's view of this process (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun(env)
    if _is_mpi(env):
        return _mpi(env, mpi_rendezvous)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _slurm(env, scontrol)
    return DistEnv("none", 0, 1, 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT") or free_port()))


def launcher_rank(environ: Optional[Mapping[str, str]] = None) -> int:
    """This process's global rank from the launcher's variables alone (no MPI calls), for
    choosing what to log before ``init()``; 0 when none is set."""
    env = os.environ if environ is None else environ
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def check_layout(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> int:
    """The data-parallel size; a clear error when TP x PP does not divide the world."""
    mp = tensor_parallel * pipeline_parallel
    if world_size == 1 and mp > 1:
        raise LaunchError(f"one process (no torchrun, srun or mpiexec variables) but "
                          f"parallel.tensor_parallel={tensor_parallel} x "
                          f"parallel.pipeline_parallel={pipeline_parallel} needs {mp}: start it "
                          "with a launcher, e.g. launch/torchrun.sh CONFIG (launch/*.sh)")
    if world_size % mp:
        raise LaunchError(f"world size {world_size} is not divisible by parallel.tensor_parallel="
                          f"{tensor_parallel} x parallel.pipeline_parallel={pipeline_parallel}; "
                          f"launch a multiple of {mp} processes or change the layout")
    return world_size // mp


def die_with_parent(signum: int = 15) -> bool:
    """Ask Linux to send ``signum`` (SIGTERM) to this process when its parent dies (prctl
    PR_SET_PDEATHSIG). torchrun's workers otherwise train on as orphans after a kill -9 of the
    agent, and a restart then writes the same out_dir; with it, they get the SIGTERM a
    preemption gives (finish the step, checkpoint, exit). Returns whether it was set."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signum, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: act on it now
        os.kill(os.getpid(), signum)
    return True


def init(tensor_parallel: int = 1, pipeline_parallel: int = 1, device: str = "auto",
         timeout_s: float = 600.0) -> DistEnv:
    """Detect the launcher, check the layout, export the torch rendezvous variables and start
    the default process group (nccl on GPU, gloo on CPU). Returns the ``DistEnv``; a process
    group that already exists is kept."""
    from datetime import timedelta

    if dist.is_initialized():  # the caller's group (tests, notebooks): its ranks are the truth
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        env = DistEnv("existing", dist.get_rank(), dist.get_world_size(), local,
                      int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), 0, 1,
                      os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", 0)))
    else:
        env = detect()
    check_layout(env.world_size, tensor_parallel, pipeline_parallel)
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise LaunchError("train.device=cuda but no CUDA GPU is visible; use "
                              "train.device=cpu")
        count = torch.cuda.device_count()
        if count > 1 and env.local_rank >= count:
            raise LaunchError(f"{env.local_world_size} processes on this node but only "
                              f"{count} GPUs are visible: start one process per GPU "
                              "(GPUS_PER_NODE)")
        # one visible GPU per process (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES): index 0
        torch.cuda.set_device(env.local_rank if count > 1 else 0)
    if dist.is_initialized():
        return env
    if env.source == "torchrun":
        die_with_parent()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(env.local_world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return env
