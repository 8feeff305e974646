"""``mpiexec -n 2`` (pip's mpi4py + mpich) runs the tiny job to completion through
launch/mpirun.sh: megalora.distributed reads the MPI rank variables and broadcasts the
rendezvous address with mpi4py; the run is the README's main job, with its figures, and the
adapter is saved."""

import os
import shutil
import subprocess

import pytest

from helpers import ROOT, context_free_losses, launch_env, requirement, train_summary
from megalora.umm.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.mpi]  # mpiexec runs the main job


def _missing():
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if shutil.which("mpiexec", path=launch_env()["PATH"]) is None:
        return "mpiexec not found (pip install mpich)"
    return None


# The main job's figures as `make demo` (torchrun) prints them, in docs/experiments.md:
# held-out text 1.14, image 0.285 (to the digits shown there).
MAIN_JOB_HELD_OUT = {"text": (1.14, 0.01), "image": (0.285, 0.001)}


def test_mpiexec_runs_the_tiny_job(tmp_path):
    requirement("mpi", _missing())
    # MEGALORA_VERBOSE=1: the launcher's rank line is a debug line (quiet by default)
    out = subprocess.run(
        ["bash", "launch/mpirun.sh", "umm_tiny", f"train.out_dir={tmp_path}",
         "train.resume=false", "train.tensorboard=false"],
        cwd=ROOT, env=launch_env(NP="2", MEGALORA_VERBOSE="1"), capture_output=True, text=True,
        timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "megalora: mpi: rank 0/2" in log, log[-4000:]
    s = train_summary(log)
    free = context_free_losses(RunConfig.from_yaml("umm_tiny"))
    for key, (figure, unit) in MAIN_JOB_HELD_OUT.items():
        # launched by mpiexec, the main job trains as under torchrun: the same figures, and
        # well below what a model that ignores the context reaches
        assert abs(s["held_out"][key] - figure) <= unit / 2 + 1e-9, (key, s)
        assert s["held_out"][key] < free[key], (key, s, free)
    assert os.path.isfile(s["adapter"]) and s["adapter"].startswith(str(tmp_path))
