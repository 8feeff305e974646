"""Helpers shared by the tests: comparisons, the repository root, launched jobs' environment."""

import os
import re

import torch

from megalora.umm.hooks import TrainerHook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (tests/ is one level down; test files are in tests/<area>/)."""


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0,
                 name: str = "") -> None:
    """allclose with a report of where and how much it differs."""
    assert actual.shape == expected.shape, \
        f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs().max().item()
    if diff.numel() and diff.max().item() > bound:
        idx = diff.argmax().item()
        raise AssertionError(f"{name}: max |diff| {diff.max().item():.3e} > {bound:.3e} at flat "
                             f"index {idx} ({actual.reshape(-1)[idx].item()!r} vs "
                             f"{expected.reshape(-1)[idx].item()!r}); "
                             f"{int((diff > bound).sum())} of {diff.numel()} elements differ")


def assert_dicts_close(actual: dict, expected: dict, rtol: float, atol: float = 0.0,
                       what: str = ""):
    assert sorted(actual) == sorted(expected), \
        f"{what}: keys differ: {sorted(set(actual) ^ set(expected))[:5]}"
    for key in expected:
        assert_close(actual[key], expected[key], rtol, atol, name=f"{what} {key}")


LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
               "LOCAL_WORLD_SIZE", "GROUP_RANK")


def launch_env(**extra) -> dict:
    """This process's environment for a launched job, without the rendezvous variables that
    the in-process test fixtures set (a job would otherwise join their port)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_"))}
    env["PYTHON"] = sys.executable
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def train_summary(log: str) -> dict:
    """The trainer's closing lines: first/last losses of the run, held-out losses, adapter."""
    import re

    out = {}
    m = re.search(r"text loss ([\d.]+) -> ([\d.]+), image loss ([\d.]+) -> ([\d.]+)", log)
    if m:
        out.update(text=(float(m[1]), float(m[2])), image=(float(m[3]), float(m[4])))
    m = re.search(r"held-out: text ([\d.]+)  image ([\d.]+)", log)
    if m:
        out["held_out"] = {"text": float(m[1]), "image": float(m[2])}
    m = re.search(r"adapter saved to (\S+)", log)
    if m:
        out["adapter"] = m[1]
    return out


def requirement(name: str, why_missing) -> None:
    """Skip when a launch prerequisite is missing, unless MEGALORA_REQUIRE_<NAME>=1 (CI) makes
    it a failure."""
    import os

    import pytest

    if why_missing is None:
        return
    if os.environ.get(f"MEGALORA_REQUIRE_{name.upper()}") == "1":
        pytest.fail(f"{name} required (MEGALORA_REQUIRE_{name.upper()}=1) but {why_missing}")
    pytest.skip(f"{name} test skipped: {why_missing}")


def context_free_losses(run) -> dict:
    """The held-out losses of the best predictor that ignores the context, from the data alone:
    ``text``, the entropy of the held-out next-token targets' frequencies (a model that learned
    only how often each token occurs); ``image``, the mean squared deviation of the held-out
    image slots' features from their mean (a model that predicts the average feature). A trained
    UMM below these used the context (the synthetic data's rules); training that is broken
    stays above them."""
    from megalora.umm.session import build_datasets

    _, held_out = build_datasets(run)
    vocab = run.model.base_vocab
    counts = torch.zeros(vocab, dtype=torch.float64)
    feats = []
    for i in range(len(held_out)):
        sample = held_out[i]
        targets = sample["tokens"][1:]
        counts += torch.bincount(targets[targets < vocab], minlength=vocab).double()
        feats.append(sample["features"].double())
    p = counts[counts > 0] / counts.sum()
    feats = torch.cat(feats)
    return {"text": float(-(p * p.log()).sum()),
            "image": float(((feats - feats.mean(0)) ** 2).mean())}


def capture_figures(monkeypatch) -> dict:
    """Every matplotlib figure saved while the test runs, by file name (the figure objects,
    with their axes and artists, for checking what was plotted)."""
    from matplotlib.figure import Figure

    saved, savefig = {}, Figure.savefig

    def capture(fig, fname, *args, **kwargs):
        # atomic writes (megalora.atomic) save to ".tmp-<random>-<name>" first
        name = re.sub(r"^\.tmp-[a-z0-9_]+-", "", os.path.basename(str(fname)))
        saved[name] = fig
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return saved


def png_summary(path) -> dict:
    """A PNG file read back: its size in pixels and the share of its pixels in colour (not
    white, grey or black: the plotted data, not the axes, ticks and text)."""
    import matplotlib.image

    img = matplotlib.image.imread(str(path))  # [h, w, channels] floats in [0, 1]
    rgb = img[..., :3].reshape(-1, 3)
    chroma = rgb.max(axis=1) - rgb.min(axis=1)
    return {"size": (img.shape[1], img.shape[0]), "colour": float((chroma > 0.15).mean())}


class HeldOutAtStart(TrainerHook):
    """The untrained model's held-out losses (adapters as initialised: B = 0), on the batches
    the trainer's final evaluation uses: the baseline that training must beat."""

    name = "held_out_at_start"

    def start(self, session, step):
        from megalora.umm.session import evaluate

        first = session.evals.state_dict()
        self.losses = evaluate(session.runner, session.run, session.evals, session.device)
        session.evals.load_state_dict(first)

    def finish(self, session, completed):
        return self.losses
