"""The trainer under faults: an earlier run's checkpoints in out_dir, inf/nan losses, damaged or
incompatible checkpoints, a second run on the same out_dir, leftovers of a kill, an out_dir that
cannot be written. Each test fails on the trainer before these were handled."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import launch_env

from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig


def _run(tmp, steps, **over):
    raw = {"parallel": over.pop("parallel", {}),
           "train": {"steps": steps, "out_dir": str(tmp), "log_every": 100, "save_every": 1,
                     "device": "cpu", "warmup_steps": 1, "tensorboard": False,
                     **over.pop("train", {})},
           "data": {"synthetic_samples": 32, "eval_samples": 0, **over.pop("data", {})},
           **over}
    return RunConfig.from_dict(raw)


def _train_or_error(rank, world, run, max_steps=0):
    """train(), or the user error it raised as (type name, message)."""
    from megalora.errors import is_user_error
    from megalora.umm.train import train

    try:
        return train(run, max_steps_this_run=max_steps)
    except Exception as exc:  # noqa: BLE001
        if not is_user_error(exc):
            raise
        return {"error": type(exc).__name__, "message": str(exc)}


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


def _steps(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    return sorted(d for d in os.listdir(root) if d.startswith("step_"))


@pytest.mark.slow
def test_fresh_run_keeps_its_checkpoints_beside_an_earlier_longer_run(tmp_path):
    """resume=false where an earlier run left step_000006: the new run's step_000002 used to be
    pruned right after it was written (the two highest steps were kept), leaving `latest`
    pointing at nothing."""
    from megalora.umm.run_checkpoint import latest_checkpoint

    run_distributed(1, _train_or_error, (_run(tmp_path, 6),))
    earlier = _tensors(os.path.join(tmp_path, "checkpoints", "step_000006",
                                    "adapter.safetensors"))
    again = _run(tmp_path, 3, train={"resume": False})
    result = run_distributed(1, _train_or_error, (again,))[0]
    assert "error" not in result, result
    assert _steps(tmp_path) == ["step_000002", "step_000003"]
    latest = latest_checkpoint(str(tmp_path))
    assert latest.endswith("step_000003")
    # nothing of the earlier run was deleted: it was set aside
    aside = [d for d in os.listdir(tmp_path) if d.startswith("checkpoints.before-")]
    assert len(aside) == 1
    moved = _tensors(os.path.join(tmp_path, aside[0], "step_000006", "adapter.safetensors"))
    assert all(torch.equal(moved[k], earlier[k]) for k in earlier)
    # and the new run resumes from its own checkpoint (a longer run continues at step 4)
    longer = run_distributed(1, _train_or_error, (_run(tmp_path, 4),))[0]
    assert "error" not in longer and len(longer["losses"]) == 1, longer


@pytest.mark.slow
def test_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_distributed(1, _train_or_error, (_run(tmp_path, 1),))
    finally:
        os.umask(old)
    step = os.path.join(tmp_path, "checkpoints", "step_000001")
    for path in [os.path.join(tmp_path, "adapter.safetensors")] + \
            [os.path.join(step, f) for f in os.listdir(step)]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_saves_nothing_non_finite(tmp_path):
    """lr=1e30: the loss goes inf/nan at step 2. The run used to finish "successfully"
    and write NaN adapters into checkpoints and adapter.safetensors."""
    from megalora.umm.run_checkpoint import latest_checkpoint

    run = _run(tmp_path, 8, train={"lr": 1e30, "min_lr": 1e30, "clip_grad": 0.0})
    result = run_distributed(1, _train_or_error, (run,))[0]
    assert result.get("error") == "NonFiniteError", result
    assert "train.lr" in result["message"] and "train.nonfinite=skip" in result["message"]
    assert not os.path.exists(os.path.join(tmp_path, "adapter.safetensors"))
    steps = _steps(tmp_path)
    for name in steps:  # every checkpoint kept is finite, and `latest` names one of them
        tensors = _tensors(os.path.join(tmp_path, "checkpoints", name, "adapter.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values()), name
    assert steps and latest_checkpoint(str(tmp_path)).endswith(steps[-1])
    assert steps[-1] in result["message"]


@pytest.mark.slow
def test_nan_skip_makes_no_update_and_stops_after_too_many(tmp_path):
    """train.nonfinite=skip: a non-finite step leaves the adapter unchanged (the checkpoint of
    a skipped step equals the one before it), and too many in a row stop the run."""
    run = _run(tmp_path, 12, train={"lr": 1e30, "min_lr": 1e30, "clip_grad": 0.0,
                                    "nonfinite": "skip", "max_nonfinite_skips": 2})
    result = run_distributed(1, _train_or_error, (run,))[0]
    assert result.get("error") == "NonFiniteError", result
    assert "3 steps in a row" in result["message"]
    steps = _steps(tmp_path)  # the two newest: both skipped steps, equal to each other
    a, b = (_tensors(os.path.join(tmp_path, "checkpoints", s, "adapter.safetensors"))
            for s in steps)
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)


@pytest.mark.slow
def test_resume_refuses_other_settings_before_loading(tmp_path):
    """A checkpoint made with the megatron optimizer resumed with train.optimizer=torch (or
    another rank) used to fail inside the optimizer with a raw KeyError/shape error."""
    run_distributed(1, _train_or_error, (_run(tmp_path, 1),))
    other = _run(tmp_path, 2, train={"optimizer": "torch"}, lora={"rank": 4, "num_heads": 2,
                                                                   "routing": "modality"})
    result = run_distributed(1, _train_or_error, (other,))[0]
    assert result.get("error") == "AgreedError", result
    message = result["message"]
    assert "train.optimizer: 'megatron' -> 'torch'" in message and "lora.rank: 8 -> 4" in message
    assert "train.resume=false" in message


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["state.json", "optim_tp0_pp0.pt"])
def test_damaged_checkpoint_names_the_file(tmp_path, victim):
    run_distributed(1, _train_or_error, (_run(tmp_path, 1),))
    path = os.path.join(tmp_path, "checkpoints", "step_000001", victim)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    result = run_distributed(1, _train_or_error, (_run(tmp_path, 2),))[0]
    assert result.get("error") == "AgreedError", result
    assert path in result["message"] and "train.resume=false" in result["message"]


def test_claim_tidies_leftovers_and_refuses_a_second_writer(tmp_path):
    from megalora.errors import UsageError
    from megalora.umm.rundir import claim

    root = tmp_path / "checkpoints"
    (root / "step_000009.partial").mkdir(parents=True)
    (root / ".tmp-abc-latest").write_text("step_000009\n")
    (tmp_path / ".tmp-xyz-adapter.safetensors").write_bytes(b"half")
    (root / "step_000004").mkdir()
    (root / "latest").write_text("step_000004\n")
    lock = claim(str(tmp_path), fresh=False)
    try:
        assert sorted(os.listdir(root)) == ["latest", "step_000004"]
        assert not (tmp_path / ".tmp-xyz-adapter.safetensors").exists()
        # POSIX locks belong to a process: a second process must be refused
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from megalora.umm.rundir import claim\n"
             "try:\n    claim(sys.argv[1], fresh=False)\nexcept Exception as e:\n"
             "    print(e); sys.exit(3)", str(tmp_path)], capture_output=True, text=True)
        assert probe.returncode == 3, probe.stdout + probe.stderr
        assert "in use by another run" in probe.stdout and f"pid {os.getpid()}" in probe.stdout
    finally:
        lock.release()
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(UsageError, match="train.out_dir"):
        claim(str(blocked / "run"), fresh=True)


def _cli(args, env_extra=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "megalora", *args], capture_output=True,
                          text=True, timeout=timeout, env=launch_env(**(env_extra or {})))


def test_cli_prints_one_line_for_a_user_error_and_the_traceback_with_verbose(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    done = _cli(["train", "--config", str(empty)])
    assert done.returncode == 2
    errors = [x for x in done.stderr.splitlines() if x.startswith("megalora: error")]
    assert len(errors) == 1 and "is empty" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    verbose = _cli(["train", "--config", str(empty), "--verbose"])
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_torchrun_config_error_is_printed_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "megalora",
           "train", "--config", "umm_tiny", "train.resume=maybe", f"train.out_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env())
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert text.count("train.resume must be true or false") == 1, text
    assert "megalora/umm/config" not in text, text  # no traceback of ours


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "megalora")
    assert os.path.isfile(exe), "pip install -e . did not install the `megalora` command"
    done = subprocess.run([exe, "plan", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--config" in done.stdout


def _workers_of(out_dir):
    """Pids of processes whose command line names ``out_dir`` (the trainer's workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if out_dir.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_workers_checkpoint_and_stop_when_torchrun_is_killed(tmp_path):
    """kill -9 of the torchrun agent used to leave its workers training on (writing out_dir
    while a restart would too). Now they get SIGTERM from the kernel (PR_SET_PDEATHSIG):
    finish the step, checkpoint, exit."""
    import signal
    import time

    from megalora.umm.run_checkpoint import latest_checkpoint

    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "megalora",
           "train", "--config", "umm_tiny", "train.steps=100000", "train.log_every=1",
           "train.save_every=0", "data.eval_samples=0", f"train.out_dir={out}"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=launch_env())
    try:
        for line in agent.stdout:
            if line.startswith("step "):
                break
        assert len(_workers_of(out)) >= 2, "the workers did not start"
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 180
        while _workers_of(out) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _workers_of(out), "orphaned workers still running 180 s after the kill"
        assert latest_checkpoint(out) is not None, "no checkpoint saved on the way out"
    finally:
        for pid in _workers_of(out):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("overrides, message", [
    (["train.resume=maybe"], r"train.resume must be true or false, got 'maybe'"),
    (["train.steps=ten"], r"train.steps must be an integer, got 'ten'"),
    (["train.lr=abc"], r"train.lr must be a number, got 'abc'"),
    (["lora.num_heads=3"], r"lora.routing='modality' needs lora.num_heads=2"),
    (["data.synthetic_samples=0"], r"data.synthetic_samples must be a positive int, got 0"),
    (["data.eval_samples=-1"], r"data.eval_samples must be an int >= 0"),
    (["train.nonfinite=ignore"], r"train.nonfinite must be stop or skip"),
])
def test_bad_config_values_are_refused_with_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_yaml("umm_tiny", overrides)


def test_a_section_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train: 5\n")
    with pytest.raises(ValueError, match="config section 'train' must be a mapping"):
        RunConfig.from_yaml(str(config))


def test_yaml_reads_exponent_numbers_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) read `lr: 5e-3` and `train.lr=1e9` as strings, which failed later
    with a raw TypeError; YAML 1.2, JSON and Python read them as numbers."""
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  lr: 5e-3\n  min_lr: 1E-4\n  steps: 1e3\nlora:\n  rank: 4\n"
                      "  alpha: 8\n  num_heads: 2\n  routing: modality\n")
    run = RunConfig.from_yaml(str(config), ["train.clip_grad=2e0"])
    assert (run.train.lr, run.train.min_lr, run.train.steps) == (5e-3, 1e-4, 1000)
    assert isinstance(run.train.steps, int) and run.train.clip_grad == 2.0
    assert run.lora.alpha == 8.0


def test_empty_config_is_refused(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="is empty"):
        RunConfig.from_yaml(str(config))
