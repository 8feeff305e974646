"""The launch scripts' input checks and torchrun's preemption exit (``megalora.elastic``).

* every number a script reads is checked up front: a bad one exits 2 naming the variable, its
  value and what to set (no bash "division by 0" / "unbound variable");
* PYTHON must import torch and megalora: otherwise exit 2 saying which interpreter was tried
  and what to set; with PYTHON unset and no venv active the repository's .venv is the default;
* ``python -m megalora.elastic`` (torchrun) on SIGTERM exits 0 with one line when the workers
  reported a saved checkpoint through ``MEGALORA_PREEMPT_FILE``, else 128 + 15, never with a
  SignalException traceback. Tested with a stubbed torchrun, with the real torchrun and stand-in
  workers, and end to end through launch/torchrun.sh and the trainer.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT, launch_env

# variables the scripts read: a developer's own exports must not leak into the cases
SCRIPT_VARS = ("GPUS_PER_NODE", "NPROC", "NP", "NODES", "OMP_NUM_THREADS", "RDZV_PORT",
               "MASTER_PORT", "MAX_REQUEUES", "LAUNCH_MODE", "PYTHON", "VIRTUAL_ENV",
               "CONDA_PREFIX", "MEGALORA_PREEMPT_FILE")


def _env(**extra):
    env = {k: v for k, v in launch_env().items() if k not in SCRIPT_VARS}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}  # None: leave the variable unset


def _script(script, *args, cwd=ROOT, **env):
    path = script if os.path.isabs(script) else os.path.join(ROOT, "launch", script)
    return subprocess.run(["bash", path, *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


# --- numbers ------------------------------------------------------------------------------

@pytest.mark.parametrize("script, var, value", [
    ("torchrun.sh", "GPUS_PER_NODE", "0"),      # was: bash division by 0
    ("torchrun.sh", "GPUS_PER_NODE", "abc"),    # was: abc: unbound variable
    ("torchrun.sh", "NPROC", "abc"),
    ("torchrun.sh", "NPROC", "0"),
    ("torchrun.sh", "OMP_NUM_THREADS", "many"),
    ("mpirun.sh", "NP", "abc"),
    ("mpirun.sh", "NODES", "0"),                # was: division by 0 in NP % NODES
    ("srun.sh", "NODES", "two"),
    ("srun.sh", "MASTER_PORT", "70000"),
    ("sbatch.sh", "RDZV_PORT", "abc"),
    ("sbatch.sh", "MAX_REQUEUES", "-1"),
    ("sbatch.sh", "GPUS_PER_NODE", "8x"),
])
def test_bad_number_is_named_with_what_to_set(script, var, value):
    out = _script(script, "umm_tiny", "--dry-run", **{var: value})
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert f"{var}='{value}' is not a whole number" in out.stderr, out.stderr
    assert f"set {var} to" in out.stderr and "unset it" in out.stderr, out.stderr
    for text in ("unbound variable", "division", "Traceback"):
        assert text not in out.stderr, out.stderr
    assert "megalora: dry run" not in out.stdout  # stopped before anything ran


def test_numbers_at_the_edges_are_accepted():
    out = _script("sbatch.sh", "umm_tiny", "--dry-run", GPUS_PER_NODE="04",  # not octal
                  MAX_REQUEUES="0", RDZV_PORT="65535")
    assert out.returncode == 0, out.stderr
    assert "--nproc_per_node=4 " in out.stdout and "world size 4" in out.stdout
    assert ":65535 " in out.stdout and "-m megalora.elastic" in out.stdout


# --- PYTHON -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv without packages: an interpreter without torch (wherever this suite runs)."""
    where = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   timeout=120)
    return str(where / "bin" / "python")


def _launch_copy(tmp_path, venv_python=None):
    """launch/{common,torchrun}.sh in a repository of their own, with .venv/bin/python only
    when venv_python is given (a stand-in that runs it)."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for name in ("common.sh", "torchrun.sh"):
        shutil.copy(os.path.join(ROOT, "launch", name), repo / "launch" / name)
    if venv_python:
        (repo / ".venv" / "bin").mkdir(parents=True)
        stand_in = repo / ".venv" / "bin" / "python"
        stand_in.write_text(f'#!/bin/sh\nexec "{venv_python}" "$@"\n')
        stand_in.chmod(0o755)
    return str(repo / "launch" / "torchrun.sh")


def test_python_without_torch_gets_a_hint(bare_python):
    out = _script("torchrun.sh", "umm_tiny", "--dry-run", PYTHON=bare_python)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"{bare_python} (PYTHON={bare_python}) cannot import torch" in out.stderr, out.stderr
    assert "set PYTHON=" in out.stderr and "activate" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "ModuleNotFoundError" not in out.stderr


def test_python_unset_without_venv_gets_a_hint(tmp_path, bare_python):
    script = _launch_copy(tmp_path)  # no .venv next to it
    path = os.path.dirname(bare_python) + os.pathsep + "/usr/bin:/bin"
    out = _script(script, "umm_tiny", "--dry-run", PYTHON=None, PATH=path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "(PYTHON unset, so python) cannot import torch" in out.stderr, out.stderr
    assert "set PYTHON=/path/to/.venv/bin/python" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_python_unset_defaults_to_the_repository_venv(tmp_path, bare_python):
    script = _launch_copy(tmp_path, venv_python=sys.executable)
    path = os.path.dirname(bare_python) + os.pathsep + "/usr/bin:/bin"  # python: no torch
    out = _script(script, "umm_tiny", "--dry-run", PYTHON=None, PATH=path)
    assert out.returncode == 0, out.stderr
    venv = str(tmp_path / "repo" / ".venv" / "bin" / "python")
    assert f"megalora: torchrun: {venv} -m megalora.elastic" in out.stdout, out.stdout
    # an active venv wins over the repository's: its python is the one on PATH
    out = _script(script, "umm_tiny", "--dry-run", PYTHON=None, PATH=path,
                  VIRTUAL_ENV=os.path.dirname(os.path.dirname(bare_python)))
    assert out.returncode == 2 and "(PYTHON unset, so python)" in out.stderr, out.stderr


# --- megalora.elastic with a stubbed torchrun ----------------------------------------------

@pytest.fixture
def elastic(monkeypatch):
    import megalora.elastic as elastic

    monkeypatch.delenv(elastic.PREEMPT_FILE_ENV, raising=False)  # restored afterwards
    return elastic


def _stub(elastic, monkeypatch, step=None, sig=None, error=None):
    """torchrun stand-in: rank 0's report (step), then the agent's SignalException (sig)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    seen = {}

    def fake_torchrun(argv):
        seen["argv"], seen["path"] = argv, os.environ[elastic.PREEMPT_FILE_ENV]
        assert os.path.isfile(seen["path"])  # fresh and empty: nothing reported yet
        assert open(seen["path"]).read() == ""
        if step is not None:
            with open(seen["path"], "w") as f:
                f.write(f"{step}\n")
        if sig is not None:
            raise SignalException(f"got {sig}", sigval=sig)
        if error is not None:
            raise error

    monkeypatch.setattr(elastic, "_torchrun", fake_torchrun)
    return seen


def test_elastic_signal_with_report_exits_0(elastic, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)
    seen = _stub(elastic, monkeypatch, step=40, sig=signal.SIGTERM)
    argv = ["--standalone", "--nproc_per_node=2", "-m", "megalora", "train"]
    assert elastic.main(argv) == 0
    out = capsys.readouterr()
    assert out.out == "megalora: preempted; checkpoint at step 40 saved; rerun to resume\n"
    assert out.err == "" and seen["argv"] == argv  # torchrun's arguments untouched
    assert not os.path.exists(seen["path"])
    assert signal.getsignal(signal.SIGTERM) == before


def test_elastic_signal_without_report_exits_128_plus_signal(elastic, monkeypatch, capsys):
    seen = _stub(elastic, monkeypatch, sig=signal.SIGTERM)
    assert elastic.main(["x.py"]) == 128 + signal.SIGTERM
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1, out
    assert out.err.startswith("megalora: stopped by SIGTERM; no checkpoint was reported")
    assert not os.path.exists(seen["path"])
    _stub(elastic, monkeypatch, sig=signal.SIGINT)
    assert elastic.main(["x.py"]) == 128 + signal.SIGINT


def test_elastic_success_exits_0_silently(elastic, monkeypatch, capsys):
    seen = _stub(elastic, monkeypatch)
    assert elastic.main(["x.py"]) == 0
    assert capsys.readouterr().out == "" and not os.path.exists(seen["path"])


def test_elastic_worker_failure_propagates(elastic, monkeypatch):
    seen = _stub(elastic, monkeypatch, error=RuntimeError("worker 1 failed"))
    with pytest.raises(RuntimeError, match="worker 1 failed"):  # torchrun's own exit path
        elastic.main(["x.py"])
    assert not os.path.exists(seen["path"])


def test_elastic_inherited_path_starts_empty(elastic, monkeypatch, tmp_path, capsys):
    stale = tmp_path / "report"
    stale.write_text("7\n")  # an earlier run's report: not this run's checkpoint
    monkeypatch.setenv(elastic.PREEMPT_FILE_ENV, str(stale))
    seen = _stub(elastic, monkeypatch, sig=signal.SIGTERM)
    assert elastic.main(["x.py"]) == 128 + signal.SIGTERM
    assert seen["path"] == str(stale) and not stale.exists()
    assert "step 7" not in capsys.readouterr().out


# --- megalora.elastic with the real torchrun and stand-in workers --------------------------

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    # one file per rank: the two workers share the log, where their lines can interleave
    open(os.path.join(os.environ["READY_DIR"], "ready" + os.environ["RANK"]), "w").close()
    while not stop:
        time.sleep(0.02)
    if os.environ["RANK"] == "0" and os.environ["REPORT"] == "1":
        with open(os.environ["MEGALORA_PREEMPT_FILE"], "w") as f:
            f.write("40\\n")
    # one write(2) per line: print() in unbuffered mode wrote the pieces one by one and the
    # two workers' lines interleaved in the shared log ("workerworker 0  saved ...", CI stop 24)
    os.write(1, ("worker " + os.environ["RANK"] + " saved and exits 0\\n").encode())
""")


def _start(cmd, log, env):
    """A launcher in a session of its own, so that cleanup reaches every process it started
    (the old torchrun.sh left torchrun and its workers running when it was killed)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_all(proc, grace=60):
    """SIGTERM to the launcher's session, SIGKILL after ``grace`` s: torchrun starts its
    workers in sessions of their own, so it must live to pass the signal on."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.time() + grace
        try:
            os.killpg(proc.pid, sig)
            while time.time() < deadline:
                proc.poll()  # reap the launcher itself, or the group never empties
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            break
    proc.wait()


def _wait_for(log, pattern, proc, timeout, ready=None):
    """Until ``pattern`` is in the log (or, with ``ready``, until every one of those files
    exists)."""
    deadline = time.time() + timeout
    done = ((lambda: all(os.path.exists(p) for p in ready)) if ready is not None
            else (lambda: re.search(pattern, log.read_text(), re.M)))
    while not done():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("report, code", [(True, 0), (False, 128 + 15)])
def test_torchrun_sigterm_exit(tmp_path, report, code):
    worker, log = tmp_path / "worker.py", tmp_path / "log"
    worker.write_text(WORKER)
    report_file = tmp_path / "preempt"
    env = _env(REPORT="1" if report else "0", MEGALORA_PREEMPT_FILE=str(report_file),
               READY_DIR=str(tmp_path))
    proc = _start([sys.executable, "-m", "megalora.elastic", "--standalone",
                   "--nproc_per_node=2", str(worker)], log, env)
    try:
        _wait_for(log, None, proc, 120, ready=[tmp_path / "ready0", tmp_path / "ready1"])
        proc.send_signal(signal.SIGTERM)  # to torchrun only, as a scheduler would
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
    finally:
        _kill_all(proc)
    text = log.read_text()
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]
    assert "worker 0 saved and exits 0" in text, text[-3000:]
    line = "megalora: preempted; checkpoint at step 40 saved; rerun to resume"
    assert (line in text) == report and ("stopped by SIGTERM" in text) != report, text[-3000:]
    assert not report_file.exists()


# --- END TO END: launch/torchrun.sh + the trainer ------------------------------------------
# Needs the trainer side of the contract (megalora/umm/train.py): after a preemption checkpoint
# is written by all ranks, global rank 0 writes the step ("40\n") to $MEGALORA_PREEMPT_FILE.

@pytest.mark.slow
def test_end_to_end_torchrun_sh_sigterm_saves_and_exits_0(tmp_path):
    log, out_dir = tmp_path / "log", tmp_path / "out"
    cmd = ["bash", os.path.join(ROOT, "launch", "torchrun.sh"), "umm_tiny",
           f"train.out_dir={out_dir}", "train.steps=500", "train.save_every=0",
           "train.log_every=1", "train.tensorboard=false", "train.resume=false"]
    proc = _start(cmd, log, _env(NPROC="2"))
    try:
        _wait_for(log, r"^step +\d+ ", proc, 600)
        proc.send_signal(signal.SIGTERM)  # the script execs torchrun: this is torchrun's pid
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        _kill_all(proc)
    text = log.read_text()
    m = re.search(r"^megalora: preempted; checkpoint at step (\d+) saved; rerun to resume$",
                  text, re.M)
    assert m and "Traceback" not in text, text[-4000:]
    latest = (out_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{int(m[1]):06d}", (latest, m[0])
