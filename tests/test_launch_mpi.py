"""``mpiexec -n 2`` (pip's mpi4py + mpich) runs the tiny job to completion through
launch/mpirun.sh: megalora.distributed reads the MPI rank variables and broadcasts the
rendezvous address with mpi4py; both losses fall and the adapter is saved."""

import os
import shutil
import subprocess

from helpers import launch_env, requirement, train_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _missing():
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if shutil.which("mpiexec", path=launch_env()["PATH"]) is None:
        return "mpiexec not found (pip install mpich)"
    return None


def test_mpiexec_runs_the_tiny_job(tmp_path):
    requirement("mpi", _missing())
    out = subprocess.run(
        ["bash", "launch/mpirun.sh", "umm_tiny", f"train.out_dir={tmp_path}",
         "train.resume=false", "train.tensorboard=false"],
        cwd=ROOT, env=launch_env(NP="2"), capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "megalora: mpi: rank 0/2" in log, log[-4000:]
    s = train_summary(log)
    assert s["text"][1] < 0.6 * s["text"][0] and s["image"][1] < 0.7 * s["image"][0], s
    assert os.path.isfile(s["adapter"]) and s["adapter"].startswith(str(tmp_path))
