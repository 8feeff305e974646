"""Launcher environment parsing (megalora.distributed.detect) against hand-written environments
of torchrun, SLURM (single and multi node, compressed node lists), MPI (MPICH, Open MPI) and
inconsistent ones; the layout check; config names; the launch scripts' --dry-run."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT
from megalora.distributed import (LaunchError, check_layout, detect, expand_nodelist,
                                  expand_tasks_per_node, launcher_rank)


def _slurm(procid, ntasks, localid, nodeid, nodelist, per_node, nnodes, **extra):
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
           "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
           "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_STEP_NUM_NODES": str(nnodes),
           "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}
    env.update(extra)
    return env


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}  # torchrun under srun: torchrun wins
    d = detect(env)
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size) == \
        ("torchrun", 5, 8, 1, 4)
    assert (d.node_rank, d.num_nodes, d.master_addr, d.master_port) == (1, 2, "node1", 29500)


def test_slurm_single_node():
    d = detect(_slurm(1, 2, 1, 0, "vm", "2", 1))
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size) == \
        ("slurm", 1, 2, 1, 2)
    assert (d.master_addr, d.master_port, d.num_nodes) == ("vm", 20000 + 123456 % 20000, 1)


def test_slurm_multi_node_compressed_nodelist():
    # 5 nodes gpu01-04 and gpu07, 8 tasks on each but 4 on the last; task 37 is on gpu07
    env = _slurm(33, 36, 1, 4, "gpu[01-04,07]", "8(x4),4", 5, MASTER_PORT="31000")
    d = detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank, d.num_nodes) \
        == (33, 36, 1, 4, 4, 5)
    assert (d.master_addr, d.master_port) == ("gpu01", 31000)
    assert expand_nodelist("gpu[01-04,07],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu04",
                                                      "gpu07", "cpu1"]
    assert expand_tasks_per_node("8(x4),4") == [8, 8, 8, 8, 4]


def test_slurm_nodelist_falls_back_to_scontrol(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hostlist(name, *args, **kwargs):
        if name == "hostlist":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hostlist)
    calls = []
    d = detect(_slurm(0, 4, 0, 0, "n[1-2]", "2(x2)", 2),
               scontrol=lambda s: calls.append(s) or ["n1", "n2"])
    assert calls == ["n[1-2]"] and d.master_addr == "n1"


def test_mpi_mpich_and_openmpi():
    seen = []

    def rendezvous(addr, port):  # stands in for the mpi4py broadcast of rank 0's address
        seen.append((addr, port))
        return {"world_size": 4, "local_rank": 0, "local_world_size": 2,
                "master_addr": "host0", "master_port": 41000}

    d = detect({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1",
                "MPI_LOCALNRANKS": "2"}, mpi_rendezvous=rendezvous)
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == \
        ("mpi", 3, 4, 1, 2, 1)
    assert (d.master_addr, d.master_port) == ("host0", 41000) and seen == [(None, None)]
    # Open MPI inside a SLURM batch step (which exported SLURM_PROCID=0): MPI wins
    d = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "MASTER_ADDR": "h", "MASTER_PORT": "1234", "SLURM_PROCID": "0",
                "SLURM_NTASKS": "1"}, mpi_rendezvous=lambda *a: pytest.fail("no broadcast"))
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == \
        (2, 4, 0, "h", 1234)


def test_none():
    d = detect({})
    assert (d.source, d.rank, d.world_size, d.local_rank) == ("none", 0, 1, 0)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, "rank 4 is outside world size 4"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR/MASTER_PORT are not"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    (_slurm(2, 2, 0, 0, "vm", "2", 1), "rank 2 is outside world size 2"),
    (_slurm(0, 4, 0, 0, "gpu[01-03]", "2(x2)", 2), "has 3 hosts but the step has 2 nodes"),
    (_slurm(0, 4, 0, 0, "n[1-2]", "2,1", 2), "disagree with SLURM_NTASKS=4"),
    (_slurm(0, 4, 3, 1, "n[1-2]", "2(x2)", 2), "local rank 3 is outside the 2 processes"),
    ({k: v for k, v in _slurm(0, 2, 0, 0, "vm", "2", 1).items() if k != "SLURM_STEP_ID"},
     "batch script of a 2-task job"),
    ({"PMI_RANK": "5", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
      "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 5 is outside world size 4"),
])
def test_inconsistent_variables(env, message):
    with pytest.raises(LaunchError, match=message):
        detect(env, mpi_rendezvous=lambda *a: pytest.fail("not reached"))


def test_layout_and_rank_hint():
    assert check_layout(16, 2, 2) == 4
    with pytest.raises(LaunchError, match=r"world size 6 is not divisible by .*=4 x .*=1"):
        check_layout(6, 4, 1)
    with pytest.raises(LaunchError, match=r"one process .* needs 2: .*launch/torchrun.sh"):
        check_layout(1, 2, 1)
    assert check_layout(1, 1, 1) == 1
    assert launcher_rank({"PMI_RANK": "3"}) == 3 and launcher_rank({}) == 0
    assert launcher_rank({"RANK": "1", "SLURM_PROCID": "0"}) == 1


def test_config_names():
    from megalora.umm.config import RunConfig, resolve_config

    assert resolve_config("umm_tiny").endswith(os.path.join("launch", "configs",
                                                            "umm_tiny.yaml"))
    assert RunConfig.from_yaml("umm_tiny").parallel.tensor_parallel == 2
    with pytest.raises(FileNotFoundError, match="one of launch/configs: .*umm_tiny"):
        resolve_config("umm_tinyy")


def _script(name, *args, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    full.pop("SLURM_JOB_ID", None)
    return subprocess.run(["bash", os.path.join(ROOT, "launch", name), *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_scripts_dry_run():
    out = _script("torchrun.sh", "umm_tiny", "train.steps=7", "--dry-run", NPROC="4")
    assert out.returncode == 0, out.stderr
    assert "--nproc_per_node=4" in out.stdout and "train.steps=7" in out.stdout
    assert "world size 4" in out.stdout and "data parallel     2" in out.stdout
    assert "steps             7" in out.stdout and "dry run, nothing started" in out.stdout
    out = _script("sbatch.sh", "emu2_37b", "--dry-run", GPUS_PER_NODE="8", NODES="2")
    assert out.returncode == 0, out.stderr
    assert "--rdzv_backend=c10d" in out.stdout and "world size 16" in out.stdout
    out = _script("srun.sh", "umm_tiny", "--dry-run", GPUS_PER_NODE="2", NODES="3")
    assert out.returncode == 0 and "--ntasks-per-node=2" in out.stdout, out.stderr
    assert "data parallel     3" in out.stdout
    out = _script("mpirun.sh", "umm_tiny", "--dry-run", NP="3")
    assert out.returncode == 2 and "world size 3 is not divisible" in out.stderr
    out = _script("torchrun.sh", "--dry-run")
    assert out.returncode == 2 and "usage:" in out.stderr
    out = _script("sbatch.sh", "umm_tiny", "--dry-run", LAUNCH_MODE="mpi")
    assert out.returncode == 2 and "LAUNCH_MODE must be torchrun or srun" in out.stderr
