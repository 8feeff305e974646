"""Multi-node for real: a two-host SLURM built from network namespaces on this machine
(``megalora.testing.slurm_netns``; root, iproute2, slurm-wlm, munge; `.ci/run` installs them).

Each host has its own address, hostname and /etc/hosts; a job's steps run inside their host's
namespaces, so TP stays within a host and PP, the c10d rendezvous and srun's I/O cross the
bridge between them. Through the real launch scripts:

1. ``sbatch --nodes=2`` in torchrun mode (one srun task per node, c10d rendezvous on the first
   node) and in srun mode (one task per process), and ``launch/mpirun.sh`` across both hosts
   (MPICH's hydra bootstrapped by SLURM), each training the tiny UMM at TP=2 within a host and
   PP=2 across hosts: adapters and held-out losses equal to a single-process run's;
2. the torchrun-mode job preempted (SIGTERM), checkpointed, requeued and resumed: the same
   adapter as the uninterrupted job;
3. failures: a first node the other host cannot resolve (refused before training, naming the
   host), and a host that dies mid-job (every process in its namespace killed): the job's step
   ends within a bounded time with a message, and no process is left behind.
"""

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, launch_env, requirement, train_summary

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

STEPS = 16
LAYOUT = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
          "parallel.sequence_parallel=true"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from megalora.testing.slurm_netns import NetnsSlurm, missing

    requirement("slurm", missing())
    with NetnsSlurm(str(tmp_path_factory.mktemp("netns")), hosts=2) as c:
        yield c
    assert not c.pids and not c.made  # daemons stopped, namespaces and bridge deleted
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(ns not in left for ns in c.netns.values()), left


def _overrides(out_dir):
    return [f"train.out_dir={out_dir}", f"train.steps={STEPS}", "train.save_every=0",
            "train.log_every=2", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same training in one process (TP = PP = 1): the reference."""
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, "-m", "megalora", "train", "--config", "umm_tiny",
                           "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
                           *_overrides(out)], capture_output=True, text=True, cwd=ROOT,
                          env=launch_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return train_summary(proc.stdout + proc.stderr)


def _submit(cluster, tmp_path, name, mode, *sbatch_args, script=("launch/sbatch.sh",),
            extra_env=None):
    log = tmp_path / f"{name}.out"
    args = ["--nodes=2", *sbatch_args, f"--output={log}", *script, "umm_tiny", *LAYOUT,
            *_overrides(tmp_path / name)]
    env = launch_env(LAUNCH_MODE=mode, GPUS_PER_NODE="2", MEGALORA_VERBOSE="1",
                     OMP_NUM_THREADS="1", **(extra_env or {}))
    return cluster.sbatch(args, env=env, cwd=ROOT), log


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


def _same_as(single, summary, what):
    from safetensors.torch import load_file

    a, b = load_file(single["adapter"]), load_file(summary["adapter"])
    assert sorted(a) == sorted(b), what
    for key in a:  # TP=2 x PP=2 over two hosts = one process, up to float rounding
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), (what, key)
    for key in ("text", "image"):  # printed to 4 decimals
        assert abs(summary["held_out"][key] - single["held_out"][key]) <= 2e-4, \
            (what, key, single, summary)


def _check_run(text, source, single, what):
    assert "on mlnode[1-2]" in text, text[-3000:]  # both hosts
    assert f"megalora: {source}: rank 0/4" in text, text[-3000:]  # rank 0 says it
    _same_as(single, train_summary(text), what)


@pytest.fixture(scope="module")
def uninterrupted(cluster, single, tmp_path_factory):
    """The torchrun-mode job, run to the end (text of its log)."""
    job, log = _submit(cluster, tmp_path_factory.mktemp("torchrun"), "torchrun", "torchrun")
    cluster.wait(job, timeout=600)
    return _read(log)


def test_torchrun_and_srun_modes_across_two_hosts(cluster, single, uninterrupted, tmp_path):
    for ns in cluster.netns.values():  # the hosts reach their subnet only: no default route
        routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True,
                                text=True).stdout.splitlines()
        assert routes and all(r.startswith(f"10.213.{cluster.net}.0/24") for r in routes), routes
    _check_run(uninterrupted, "torchrun", single, "torchrun")
    job, log = _submit(cluster, tmp_path, "srun", "srun", "--ntasks-per-node=2")
    cluster.wait(job, timeout=600)
    _check_run(_read(log), "slurm", single, "srun")


def test_mpirun_across_two_hosts(cluster, single, tmp_path):
    """launch/mpirun.sh inside a two-node allocation: MPICH's hydra starts its proxies with
    srun (SLURM bootstrap), two processes per host."""
    script = tmp_path / "mpi_job.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      "NP=4 NODES=2 MPI_ARGS='-bootstrap slurm -ppn 2' exec bash "
                      f"{ROOT}/launch/mpirun.sh \"$@\"\n")
    job, log = _submit(cluster, tmp_path, "mpi", "srun", "--ntasks-per-node=2",
                       script=(str(script),))
    cluster.wait(job, timeout=600)
    text = _read(log)
    assert "megalora: mpi: rank 0/4" in text, text[-3000:]
    _same_as(single, train_summary(text), "mpirun")


def test_preempted_two_node_job_requeues_and_resumes(cluster, uninterrupted, tmp_path):
    from safetensors.torch import load_file

    job, log = _submit(cluster, tmp_path, "preempted", "torchrun")
    deadline = time.time() + 300
    while not re.search(r"^step +([4-9]|1[01]) ", _read(log), re.M):  # mid-run
        assert time.time() < deadline, _read(log)[-3000:]
        cluster.wait(job, states=("RUNNING", "PENDING"), timeout=60)
        time.sleep(0.3)
    cluster._run(["scancel", "--batch", "--signal=TERM", job])  # as --signal=B:TERM@120 does
    info = cluster.wait(job, timeout=600)  # requeued, held until cred_expire, then runs
    assert info["Restarts"] == "1"
    text = _read(log)
    stopped = re.search(r"stopping at step (\d+) \(checkpoint saved\)", text)
    resumed = re.search(r"resumed from \S+step_0*(\d+) at step (\d+)", text)
    assert stopped and resumed and resumed[2] == stopped[1], text[-4000:]
    assert "megalora: requeueing job" in text
    a = load_file(train_summary(uninterrupted)["adapter"])
    b = load_file(train_summary(text.split("resumed from")[1])["adapter"])
    for key in a:  # interrupted + requeued = uninterrupted (same layout, same data order)
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


def test_first_node_that_does_not_resolve_is_refused(cluster, tmp_path):
    """mlnode2 cannot resolve mlnode1 (the rendezvous host): the job stops before training
    with one line naming both, instead of every rank retrying until its timeout."""
    cluster.write_hosts("mlnode2", ["mlnode2"])
    try:
        job, log = _submit(cluster, tmp_path, "unresolved", "torchrun")
        start = time.time()
        with pytest.raises(RuntimeError, match="ended FAILED"):
            cluster.wait(job, timeout=120)
    finally:
        cluster.write_hosts("mlnode2", cluster.names)
    text = _read(log)
    assert "the first node mlnode1 does not resolve on: mlnode2" in text, text[-3000:]
    assert "step " not in text and time.time() - start < 120


def test_a_host_that_dies_mid_job_ends_the_step(cluster, tmp_path):
    """Every process on mlnode2 (slurmd, the job's tasks) is killed mid-run, as a host that
    loses power: the ranks on mlnode1 fail on the broken connections with one line each, SLURM
    marks mlnode2 down (SlurmdTimeout 10 s) and ends the step, the job is requeued (sbatch.sh's
    --requeue: it resumes when the nodes are back) rather than left hanging, and no process of
    the job is left on mlnode1."""
    job, log = _submit(cluster, tmp_path, "host_dies", "torchrun")
    deadline = time.time() + 300
    while not re.search(r"^step +[4-9] ", _read(log), re.M):
        assert time.time() < deadline, _read(log)[-3000:]
        cluster.wait(job, states=("RUNNING", "PENDING"), timeout=60)
        time.sleep(0.3)
    assert cluster.kill_host("mlnode2")
    start = time.time()
    info = cluster.wait(job, states=("PENDING", "REQUEUED", "REQUEUE_HOLD"), timeout=180,
                        until=lambda i: i.get("JobState") in ("NODE_FAIL", "FAILED"))
    took = time.time() - start
    print(f"\nmlnode2 died; the job left RUNNING after {took:.0f} s: {info.get('JobState')} "
          f"(reason {info.get('Reason')}, restarts {info.get('Restarts')})")
    text = _read(log)
    assert "Node failure on mlnode2" in text, text[-3000:]
    assert "megalora: error on rank 1: lost the connection to another rank" in text or \
        "megalora: error: lost the connection to another rank" in text, text[-3000:]
    assert "a bug" not in text, text[-3000:]
    time.sleep(2)
    left = subprocess.run(["ip", "netns", "pids", cluster.netns["mlnode1"]],
                          capture_output=True, text=True).stdout.split()
    procs = [open(f"/proc/{p}/cmdline").read().replace("\0", " ") for p in left
             if os.path.exists(f"/proc/{p}/cmdline")]
    assert not [p for p in procs if "megalora" in p], procs
    cluster._run(["scancel", job], check=False)
