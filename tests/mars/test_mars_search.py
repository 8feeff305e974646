"""MARS end to end on the tiny UMM with its in-loop ViT: a probe's tracking leaves training
untouched (same adapter as an untracked run) and is cached; the search on cached probes
generated from known laws recovers them, writes a rank config the trainer accepts with the
chosen ranks, and its plots; bad inputs give clear errors."""

import json
import math
import os

import pytest
import torch

from helpers import capture_figures, png_summary
from megalora.mars.laws import ConvergenceLaw, PerformanceLaw
from megalora.mars.probes import ProbeSpec, convergence_step, run_probes
from megalora.umm.config import RunConfig


def _base(**train):
    overrides = ["vision.enabled=true", "parallel.tensor_parallel=1",
                 "parallel.sequence_parallel=false", "data.eval_samples=16"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return RunConfig.from_yaml("umm_tiny", overrides).to_dict()


def _untracked(rank, world, cfg):
    from megalora.umm.config import RunConfig
    from megalora.umm.train import train

    result = train(RunConfig.from_dict(cfg))
    return result["adapter"], result["eval"]


@pytest.mark.slow
def test_probe_tracking_does_not_change_training_and_is_cached(tmp_path):
    from safetensors.torch import load_file

    from megalora.mars.probes import probe_overrides
    from megalora.testing.dist import run_distributed

    base, spec = _base(), ProbeSpec(r_v=2, r_l=4, samples=32, steps=12, batch=1)
    base["model"]["image_loss_weight"] = 0.5  # so that the probe's loss must weigh its parts
    record = run_probes([spec], base, str(tmp_path), every=3)[0]
    assert record["eval_steps"] == [3, 6, 9, 12]
    assert len(record["contribution"]["llm"]) == 4 and record["sequences"] == 12 * 2
    tracked = load_file(tmp_path / "runs" / spec.key / "adapter.safetensors")
    cfg = probe_overrides(base, 2, 4, 32, 12, str(tmp_path / "plain"), micro_batch_size=1)
    adapter, held_out = run_distributed(1, _untracked, (cfg,))[0]
    plain = load_file(adapter)
    assert sorted(tracked) == sorted(plain)
    for key in plain:  # B zeroed and restored around each evaluation: bit for bit
        assert torch.equal(tracked[key], plain[key]), key
    # the probe's held-out losses are the untracked run's, and its loss weighs them as the
    # model does (model.text_loss_weight, model.image_loss_weight)
    model = RunConfig.from_dict(cfg).model
    assert (record["text"], record["image"]) == (held_out["text"], held_out["image"])
    assert record["loss"] == pytest.approx(model.text_loss_weight * held_out["text"] +
                                           model.image_loss_weight * held_out["image"],
                                           rel=1e-12)
    assert any(k.startswith("vision.") and k.endswith("lora_A") for k in plain)
    path = tmp_path / "probes" / (spec.key + ".json")
    before = path.stat().st_mtime_ns
    again = run_probes([spec], base, str(tmp_path), every=3)[0]
    assert path.stat().st_mtime_ns == before and again["loss"] == record["loss"]
    # contributions on the training batches: a probe of its own (its own cache key) whose
    # evaluations draw from a stream of their own, so training is again bit for bit the same
    on_train = ProbeSpec(r_v=2, r_l=4, samples=32, steps=12, batch=1, contribution_on="train")
    assert on_train.key == spec.key + "_ctrain"
    trained = run_probes([on_train], base, str(tmp_path), every=3)[0]
    again = load_file(tmp_path / "runs" / on_train.key / "adapter.safetensors")
    assert all(torch.equal(again[k], plain[k]) for k in plain)
    assert trained["loss"] == record["loss"] and trained["eval_steps"] == [3, 6, 9, 12]
    assert (trained["contribution_on"], record["contribution_on"]) == ("train", "heldout")
    assert trained["contribution"]["llm"] != record["contribution"]["llm"]  # other batches


def test_convergence_step_definition():
    steps = [5, 10, 15, 20, 25, 30]
    # 3-point running mean 0.3 0.5 0.8 0.97 1 1: 0.9 of the peak first at step 20
    assert convergence_step(steps, [0.1, 0.5, 0.9, 1.0, 1.0, 1.0], 0.9) == 20
    assert convergence_step(steps, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.9) is None  # still rising
    # flattening: the last quarter adds 0.03 < 0.1 x peak -> settled; running mean
    # .35 .47 .68 .83 .92 .96 .99 .995 first reaches 0.9 x .995 at step 25
    assert convergence_step(steps + [35, 40], [0.2, 0.5, 0.7, 0.85, 0.93, 0.97, 0.99, 1.0],
                            0.9) == 25
    assert convergence_step(steps, [0.0, -0.1, -0.2, 0.0, -0.1, 0.0], 0.9) is None  # no help
    # one positive evaluation among negative ones: the smoothed curve never helps
    assert convergence_step(steps, [-0.02, 0.004, -0.01, -0.03, -0.02, -0.01], 0.9) is None


def test_why_censored_tells_never_helping_from_still_rising():
    from megalora.mars.search import why_censored

    steps = [5, 10, 15, 20, 25, 30]
    hurts = [-0.02, 0.004, -0.01, -0.03, -0.02, -0.01]  # EmojiCap's held-out vision curves
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    records = [{"eval_steps": steps, "contribution": {"vision": c},
                "t_vision": convergence_step(steps, c, 0.9)} for c in (hurts, hurts, rising)]
    records.append({"eval_steps": steps, "contribution": {"vision": [0.1, 0.5, 0.9, 1, 1, 1]},
                    "t_vision": 20})
    assert why_censored(records, "vision") == (
        "3 of 4 probes never settled: 2 never lowered the loss: their adapters made it worse "
        "(measure on training batches: --contribution train); 1 still rising or too short: "
        "lengthen --probe-steps or lower --fraction")
    # already measured on training batches: no advice to do so
    on_train = [dict(r, contribution_on="train") for r in records[:2]]
    assert why_censored(on_train, "vision") == (
        "2 of 2 probes never settled: 2 never lowered the loss: their adapters made it worse")


def test_exponents_note_names_bound_flat_and_pinned_exponents():
    from megalora.mars.laws import EXPONENT_BOUNDS
    from megalora.mars.search import exponents_note

    # EmojiCap's probes: ranks 1 and 8, 300 and 1,000 documents
    records = [{"r_v": v, "r_l": v, "samples": d} for v in (1, 8) for d in (300, 1000)]
    fit = {"a_v": 2.14e-5, "a_l": 3.83e-3, "b": 4.41e-3}  # its default probes' law
    assert exponents_note(fit, records) == "exponents at a bound: none; flat: a_v; pinned: a_l, b"
    lo, hi = EXPONENT_BOUNDS
    # a_l x ln 8 = 4.7e-4 < 1e-3: flat; b at the upper bound, a_v at the lower
    assert exponents_note({"a_v": lo, "a_l": 2.3e-4, "b": hi}, records) == \
        "exponents at a bound: a_v, b; flat: a_l; pinned: none"


def _fake_probes(out, base, perf, vision, llm, specs):
    """Probe records as the laws say (no training): the search must read them from the cache.
    A law of None: that group never settled (censored)."""
    os.makedirs(out / "probes")
    for sp in specs:
        rec = {"r_v": sp.r_v, "r_l": sp.r_l, "samples": sp.samples, "steps": sp.steps,
               "loss": float(perf.predict(sp.r_v, sp.r_l, sp.samples)), "text": 0.0,
               "image": 0.0,
               "t_vision": vision and float(vision.predict(sp.r_v, sp.samples)),
               "t_llm": llm and float(llm.predict(sp.r_l, sp.samples)), "eval_steps": [],
               "contribution": {}, "cpu_seconds": 1.0, "sequences": 10}
        (out / "probes" / (sp.key + ".json")).write_text(json.dumps(rec))


@pytest.mark.slow
def test_search_on_cached_probes_writes_a_trainable_rank_config(tmp_path, monkeypatch):
    from megalora.mars.cli import MarsConfig, search
    from megalora.mars.search import adapter_parameters

    base = _base()
    perf = PerformanceLaw(A=8.0, E=0.4, a_v=0.1, a_l=0.35, b=0.3)
    vision = ConvergenceLaw(k=20.0, gamma=0.5, delta=0.2)
    llm = ConvergenceLaw(k=10.0, gamma=0.6, delta=0.3)
    cfg = MarsConfig(budget="uniform:4", vision_ranks=[1, 2, 4, 8, 16],
                     llm_ranks=[1, 2, 4, 8, 16], probe_vision_ranks=[1, 4, 16],
                     probe_llm_ranks=[1, 4, 16], probe_samples=[32, 128], probe_steps=40,
                     out=str(tmp_path))
    _fake_probes(tmp_path, base, perf, vision, llm, cfg.probe_specs())
    figures = capture_figures(monkeypatch)
    result = search(cfg, base, progress=lambda m: None)
    assert result["performance"]["a_l"] == pytest.approx(0.35, abs=1e-3)
    assert result["vision"]["gamma"] == pytest.approx(0.5, abs=1e-4)
    budget = adapter_parameters(base, 4, 4)
    assert result["budget"] == budget
    # what the laws say, by brute force over the menus' balanced pairs within the budget
    full = base["data"]["synthetic_samples"]
    best = None
    for r_l in cfg.llm_ranks:
        r_star = (llm.k / vision.k * full ** (llm.delta - vision.delta) * r_l ** llm.gamma) \
            ** (1 / vision.gamma)
        r_v = min(cfg.vision_ranks, key=lambda r: (abs(math.log(r / r_star)), r))
        if adapter_parameters(base, r_v, r_l) <= budget:
            loss = float(perf.predict(r_v, r_l, full))
            best = min(best or (loss, r_v, r_l), (loss, r_v, r_l))
    assert (result["choice"]["r_v"], result["choice"]["r_l"]) == best[1:]
    ranks = RunConfig.from_yaml(str(tmp_path / "ranks.yaml"))
    assert ranks.lora.rank == best[2] and ranks.lora.rank_pattern["vision.*"] == best[1]
    assert ranks.parallel.tensor_parallel == 1 and ranks.train.steps == base["train"]["steps"]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "probes").iterdir())]
    _check_laws_plot(figures["laws.png"], result, records)
    _check_candidates_plot(figures["candidates.png"], result)
    # the files: the figures' size at 100 dpi, with the data drawn in colour (measured: 1.9 %
    # and 22 % of the pixels; 0 % with empty axes)
    laws, cands = png_summary(tmp_path / "laws.png"), png_summary(tmp_path / "candidates.png")
    assert laws["size"] == (1500, 450) and laws["colour"] > 0.005, laws
    assert cands["size"] == (800, 400) and cands["colour"] > 0.05, cands


def _lines_and_points(ax):
    """{colour: (line x, line y, label)} and {colour: scatter points} of one panel."""
    from matplotlib.colors import to_hex

    lines = {to_hex(line.get_color()): (line.get_xdata(), line.get_ydata(), line.get_label())
             for line in ax.get_lines()}
    points = {to_hex(c.get_facecolor()[0]): [tuple(p) for p in c.get_offsets().tolist()]
              for c in ax.collections}
    return lines, points


def _check_laws_plot(fig, result, records):
    """Panels 1-2: each data size's fitted convergence law and its probes' convergence steps;
    panel 3: each (vision rank, data size)'s fitted performance law and its probes' losses,
    minus the fitted E."""
    import numpy as np

    assert len(fig.axes) == 3
    for ax, group, rank in ((fig.axes[0], "vision", "r_v"), (fig.axes[1], "llm", "r_l")):
        law = ConvergenceLaw(**{k: result[group][k] for k in ("k", "gamma", "delta")})
        lines, points = _lines_and_points(ax)
        assert len(lines) == len({r["samples"] for r in records}) == len(points)
        for colour, (x, y, label) in lines.items():
            d = int(label.removeprefix("D="))
            np.testing.assert_allclose(y, law.predict(np.asarray(x), d), rtol=1e-9)
            assert sorted(points[colour]) == sorted(
                (r[rank], r[f"t_{group}"]) for r in records if r["samples"] == d), (group, d)
    p = result["performance"]
    perf = PerformanceLaw(**{k: p[k] for k in ("A", "E", "a_v", "a_l", "b")})
    lines, points = _lines_and_points(fig.axes[2])
    assert len(lines) == len({(r["r_v"], r["samples"]) for r in records}) == len(points)
    for colour, (x, y, label) in lines.items():
        rv, d = (int(part.split("=")[1]) for part in label.split(", "))
        np.testing.assert_allclose(y, perf.predict(rv, np.asarray(x), d) - perf.E, rtol=1e-9)
        want = sorted((r["r_l"], r["loss"] - perf.E) for r in records
                      if r["r_v"] == rv and r["samples"] == d)
        np.testing.assert_allclose(sorted(points[colour]), want, rtol=1e-12)


def _check_candidates_plot(fig, result):
    """One bar per candidate at its predicted loss, the choice red (C3), the others C0, the
    over-budget ones hatched."""
    from matplotlib.colors import to_rgba

    (ax,) = fig.axes
    cands, choice = result["candidates"], (result["choice"]["r_v"], result["choice"]["r_l"])
    bars = ax.patches
    assert [t.get_text() for t in ax.get_xticklabels()] == \
        [f"({c['r_v']},{c['r_l']})" for c in cands]
    assert [b.get_height() for b in bars] == [c["predicted_loss"] for c in cands]
    for bar, c in zip(bars, cands):
        chosen = (c["r_v"], c["r_l"]) == choice
        assert bar.get_facecolor()[:3] == to_rgba("C3" if chosen else "C0")[:3], c
        assert (bar.get_hatch() == "//") == (not c["within_budget"]), c
    assert sum((c["r_v"], c["r_l"]) == choice for c in cands) == 1


@pytest.mark.slow
def test_search_without_settled_probes_chooses_by_the_performance_law(tmp_path):
    from megalora.mars.cli import MarsConfig, search
    from megalora.mars.search import adapter_parameters

    base = _base()
    perf = PerformanceLaw(A=8.0, E=0.4, a_v=0.15, a_l=0.35, b=0.3)
    cfg = MarsConfig(budget="uniform:2", vision_ranks=[1, 2, 4, 8], llm_ranks=[1, 2, 4],
                     probe_vision_ranks=[1, 8], probe_llm_ranks=[1, 4], probe_samples=[32, 128],
                     probe_steps=40, out=str(tmp_path))
    _fake_probes(tmp_path, base, perf, ConvergenceLaw(20.0, 0.5, 0.2), None, cfg.probe_specs())
    messages = []
    result = search(cfg, base, progress=messages.append)
    assert result["llm"] is None and "no probe settled (8 of 8" in \
        result["convergence_problems"]["llm"]
    assert any(m.startswith("not balancing the ranks: llm convergence") for m in messages)
    budget, full = result["budget"], base["data"]["synthetic_samples"]
    brute = min((float(perf.predict(rv, rl, full)), rv, rl) for rv in cfg.vision_ranks
                for rl in cfg.llm_ranks if adapter_parameters(base, rv, rl) <= budget)
    assert (result["choice"]["r_v"], result["choice"]["r_l"]) == brute[1:]
    assert "balance not used" in result["choice"]["why"] and len(result["candidates"]) == 12
    assert RunConfig.from_yaml(str(tmp_path / "ranks.yaml")).lora.rank == brute[2]


def test_rank_search_errors(tmp_path, capsys):
    from megalora.cli import main
    from megalora.mars.cli import MarsConfig

    assert main(["rank-search", "--config", "umm_tiny", "--budget", "uniform:4",
                 "--out", str(tmp_path)]) == 2
    assert "vision.enabled=true" in capsys.readouterr().err
    assert main(["rank-search", "--config", "umm_tiny", "--budget", "lots",
                 "--out", str(tmp_path), "vision.enabled=true"]) == 2
    assert "--budget must be a parameter count or uniform:R" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--probe-llm-ranks needs positive integers"):
        MarsConfig(budget="1", probe_llm_ranks=[0, 4])
    with pytest.raises(ValueError, match="--contribution must be heldout or train"):
        MarsConfig(budget="1", contribution="test")
    with pytest.raises(ValueError, match="--min-r2 must be in"):
        MarsConfig(budget="1", min_r2=1.5)
    with pytest.raises(ValueError, match="fewer than 3 evaluations"):
        MarsConfig(budget="1", probe_steps=10, every=5)
