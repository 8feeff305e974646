"""Quiet by default: the main job prints the adapter report and the progress lines, not the
upstream warnings and Megatron's INFO logs; ``--verbose`` brings those back (megalora.logs)."""

import logging
import subprocess
import sys
import warnings

import pytest

from helpers import launch_env

pytestmark = pytest.mark.slow  # runs the CLI in subprocesses

# What megatron-core / torch print that a user cannot act on (see megalora.logs).
UPSTREAM_NOISE = ("Transformer Engine", "Apex", "UserWarning", "FutureWarning",
                  "Params for bucket", "Setting up optimizer", "DistributedDataParallel")
# Lines before the first step that are neither the adapter report nor ours to remove: torchrun's
# own 4-line OMP_NUM_THREADS banner (printed by the launcher process), the launch line and the
# losses' convention (megalora.umm.model.loss_convention).
OTHER_LINES_BEFORE_FIRST_STEP = 6


def _main_job(out_dir, *extra) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "megalora",
           "train", "--config", "launch/configs/umm_tiny.yaml", "train.resume=false",
           "train.steps=2", "train.log_every=1", f"train.out_dir={out_dir}",
           "data.eval_samples=0", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env())
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    return text


@pytest.fixture(scope="module")
def quiet_log(tmp_path_factory):
    return _main_job(tmp_path_factory.mktemp("quiet"))


def _adapter_report(lines):
    """The report's lines: its header row through its 'N adapted modules; ...' summary."""
    start = next(i for i, x in enumerate(lines) if x.split()[:3] == ["module", "kind", "in"])
    end = next(i for i, x in enumerate(lines) if "adapted modules; trainable" in x)
    return lines[start:end + 1]


def test_main_job_is_quiet_by_default(quiet_log):
    lines = quiet_log.splitlines()
    noisy = [x for x in lines if any(n in x for n in UPSTREAM_NOISE)]
    assert not noisy, "upstream noise printed by default:\n" + "\n".join(noisy[:20])
    # rank 0 alone prints the report and the progress lines
    assert sum(x.split()[:3] == ["module", "kind", "in"] for x in lines) == 1, quiet_log
    assert sum(x.startswith("step     1 ") for x in lines) == 1, quiet_log
    assert "megalora: torchrun: rank 1/" not in quiet_log
    report = _adapter_report(lines)
    assert len(report) == 18, report  # header, 16 adapted modules of umm_tiny, summary
    first_step = next(i for i, x in enumerate(lines) if x.startswith("step     1 "))
    other = [x for x in lines[:first_step] if x not in report]
    assert len(other) <= OTHER_LINES_BEFORE_FIRST_STEP, \
        f"{first_step} lines before the first step, {len(other)} besides the adapter " \
        "report:\n" + "\n".join(other)
    # megalora's own verbose-only notices (TE absent, the expected kernel path on CPU)
    assert "transformer-engine not importable" not in quiet_log
    assert "LoRA adapter maths runs on" not in quiet_log


def test_verbose_brings_the_upstream_lines_back(tmp_path, quiet_log):
    text = _main_job(tmp_path, "--verbose")
    for line in ("UserWarning: Transformer Engine and Apex are not installed", "Params for bucket",
                 "Setting up optimizer", "transformer-engine not importable",
                 "LoRA adapter maths runs on the 'torch' path"):
        assert line in text, f"--verbose did not bring back {line!r}:\n{text}"
    # the same run: the figures do not depend on how much is printed
    steps = [x.split("tok/s")[0].rsplit(None, 1)[0] for x in quiet_log.splitlines()
             if x.startswith("step ")]
    assert steps and steps == [x.split("tok/s")[0].rsplit(None, 1)[0]
                               for x in text.splitlines() if x.startswith("step ")]


def _warn_from(module: str, message: str) -> None:
    warnings.warn_explicit(message, UserWarning, f"/{module.replace('.', '/')}.py", 1,
                           module=module, registry={})


def test_entry_point_filters_upstream_warnings_only_while_it_runs():
    from megalora import logs

    fallback = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()  # not pytest.ini's filters: only what entry_point sets
        outside = list(warnings.filters)
        with logs.entry_point(verbose=False):
            _warn_from("megatron.core.optimizer", fallback)
            _warn_from("megatron.core.optimizer", "a warning megalora knows nothing about")
            _warn_from("megalora.inject", fallback)  # ours are never hidden
        assert [str(w.message) for w in seen] == ["a warning megalora knows nothing about",
                                                  fallback]
        assert warnings.filters == outside
        del seen[:]
        with logs.entry_point(verbose=True):
            _warn_from("megatron.core.optimizer", fallback)
        assert [str(w.message) for w in seen] == [fallback]
        assert warnings.filters == outside


def test_entry_point_logging_levels_per_rank_and_restored():
    from megalora import logs

    root, ours = logging.getLogger(), logging.getLogger("megalora")
    before = root.level, ours.level, list(root.handlers)
    assert logs.levels(verbose=False, rank=0) == (logging.WARNING, logging.INFO)
    assert logs.levels(verbose=True, rank=0) == (logging.INFO, logging.DEBUG)
    assert logs.levels(verbose=False, rank=1) == logs.levels(verbose=True, rank=1) \
        == (logging.WARNING, logging.WARNING)
    with logs.entry_point(verbose=False, rank=0):
        assert not logging.getLogger("megatron.core.distributed").isEnabledFor(logging.INFO)
        assert ours.isEnabledFor(logging.INFO) and not ours.isEnabledFor(logging.DEBUG)
    with logs.entry_point(verbose=False, rank=1):
        assert not ours.isEnabledFor(logging.INFO) and ours.isEnabledFor(logging.WARNING)
    assert (root.level, ours.level, list(root.handlers)) == before


def test_importing_megalora_installs_no_filter_or_handler():
    # upstream first: sympy (under megatron) adds a filter of its own at import
    code = ("import logging, warnings, torch, sympy, megatron.core, megatron.core.models.gpt\n"
            "filters = list(warnings.filters)\n"
            "import megalora, megalora.cli, megalora.logs, megalora.ops, megalora.inject\n"
            "assert warnings.filters == filters, 'a megalora import changed the warning filters'\n"
            "assert not logging.getLogger().handlers and logging.getLogger().level == 30\n"
            "assert logging.getLogger('megalora').level == logging.NOTSET\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=launch_env())
    assert done.returncode == 0, done.stderr
