"""The methods experiments on EmojiCap, reduced (a few steps, 2 seeds, a tiny judge, 16 test
emoji): each script runs end to end on the real data and writes its results; a rerun trains
nothing. The full runs and their figures are in docs/pareto-emojicap.md."""

import json
import os
import sys

import pytest

from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launch", "experiments"))
SMALL = ["model.num_layers=2"]


def _pretrain_worker(rank, world, run):
    from megalora.umm.pretrain import pretrain

    return pretrain(run, progress=lambda m: None)


@pytest.fixture(scope="module")
def base(built, tmp_path_factory):
    cfg, _, _ = built
    out = tmp_path_factory.mktemp("base")
    run = RunConfig.from_yaml("emojicap_base", [
        f"data.path={cfg.out}/train_emojione", f"data.eval_path={cfg.out}/test_emojione",
        "train.steps=10", f"train.out_dir={out}", "train.save_every=0",
        "train.tensorboard=false", *SMALL])
    return run_distributed(1, _pretrain_worker, (run,))[0]["base"]


def test_pareto_emojicap_reduced(built, base, tmp_path, capsys):
    import pareto_emojicap

    cfg, _, _ = built
    args = ["--data", cfg.out, "--base", base, "--steps", "3", "--seeds", "0", "1",
            "--eval-limit", "16", "--judge-epochs", "1", "--judge-width", "8",
            "--out", str(tmp_path), *SMALL]
    assert pareto_emojicap.main(args) == 0
    res = json.load(open(tmp_path / "results.json"))
    variants = pareto_emojicap.MAIN  # the default: no ablations
    assert "pareto_tau2" not in variants and "pareto" in variants
    assert set(res["runs"]) == {f"{v}_s{s}" for v in variants for s in (0, 1)}
    for key, run in res["runs"].items():
        assert run["steps"] == 3 and run["choice_emoji"] == 16, key
        assert 0 <= run["choice_caption_to_image"] <= 1 and run["image_mse"] > 0, key
    summary = res["summary"]
    assert summary["vanilla"]["image_mse"]["diff"] == 0.0  # paired against itself
    # the same seed starts from the same init and data: a different rule changes the result
    assert summary["pareto"]["image_mse"]["values"] != summary["vanilla"]["image_mse"]["values"]
    rows = [json.loads(x) for x in open(tmp_path / "gradnorm_s0" / "pareto.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and {f for r in rows for f in r["fired"]} == \
        {"gradnorm"}
    assert sum(rows[-1]["weights"][0]) == pytest.approx(2.0)
    balance = [json.loads(x) for x in open(tmp_path / "step_balance_s1" / "pareto.jsonl")]
    assert {f for r in balance for f in r["fired"]} == {"balance"}
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {v} |" in md for v in variants)
    assert (tmp_path / "differences.png").stat().st_size > 0
    assert (tmp_path / "ratio.png").stat().st_size > 0
    capsys.readouterr()
    assert pareto_emojicap.main(args) == 0  # cached: nothing is trained or scored again
    assert json.load(open(tmp_path / "results.json"))["runs"] == res["runs"]


def test_pareto_emojicap_timing_and_conflict(built, base, tmp_path):
    import pareto_emojicap

    cfg, _, _ = built
    args = ["--data", cfg.out, "--base", base, "--steps", "3", "--seeds", "0", "--timing",
            "--variants", "vanilla", "pareto_conflict", "--out", str(tmp_path), *SMALL]
    assert pareto_emojicap.main(args) == 0
    md = (tmp_path / "timing.md").read_text()
    assert "| vanilla |" in md and "| pareto_conflict |" in md and "1.00x" in md
    assert not list(tmp_path.glob("*.eval.json"))  # timing scores nothing
    # the threshold reaches the rule: MGDA only where some cosine is below -0.05
    rows = [json.loads(x) for x in open(tmp_path / "pareto_conflict_s0" / "pareto.jsonl")]
    for r in rows:
        for fired, cos in zip(r["fired"], r["cos"]):
            assert (fired == "pareto") == (cos < -0.05), (r["step"], fired, cos)


def test_hydra_emojicap_reduced(built, base, tmp_path):
    import hydra_emojicap

    cfg, _, _ = built
    args = ["--data", cfg.out, "--base", base, "--steps", "6", "--every", "1", "--seeds", "0",
            "1", "--eval-limit", "16", "--judge-epochs", "1", "--judge-width", "8",
            "--out", str(tmp_path), *SMALL]
    assert hydra_emojicap.main(args) == 0
    res = json.load(open(tmp_path / "results.json"))
    assert set(res["runs"]) == {f"{v}_s{s}" for v in ("uniform", "masked", "hydra", "final")
                                for s in (0, 1)}
    summary = res["summary"]
    # the masked control reproduces uniform ranks (same first ranks of the factors, same scale)
    for key in ("image_mse", "text_ce"):
        assert summary["masked"][key]["values"] == pytest.approx(
            summary["uniform"][key]["values"], rel=1e-5), key
    budget = {res["runs"][f"hydra_s{s}"]["hydra_params"] for s in (0, 1)}
    assert len(budget) >= 1 and None not in budget
    final = RunConfig.from_yaml(str(tmp_path / "hydra_s0" / "hydra_ranks.yaml"))
    assert final.lora.rank_pattern  # the exported allocation, trained from the start
    assert "| final |" in (tmp_path / "results.md").read_text()


@pytest.fixture(scope="module")
def vision_base(built, tmp_path_factory):
    cfg, _, _ = built
    out = tmp_path_factory.mktemp("vision_base")
    run = RunConfig.from_yaml("emojicap_vision_base", [
        f"data.path={cfg.out}/train_emojione", f"data.eval_path={cfg.out}/test_emojione",
        "train.steps=6", f"train.out_dir={out}", "train.save_every=0",
        "train.tensorboard=false", *SMALL])
    return run_distributed(1, _pretrain_worker, (run,))[0]["base"]


def test_mars_emojicap_reduced(built, vision_base, tmp_path):
    import mars_emojicap

    cfg, _, _ = built
    args = ["--data", cfg.out, "--base", vision_base, "--steps", "3", "--seeds", "0", "1",
            "--ranks", "1", "2", "--budget", "uniform:2", "--probe-steps", "6", "--every", "2",
            "--probe-samples", "16", "48", "--probe-batch", "2", "--eval-limit", "16",
            "--out", str(tmp_path), *SMALL]
    assert mars_emojicap.main(args) == 0
    res = json.load(open(tmp_path / "results.json"))
    assert set(res["scored"]) == {f"rv{a}_rl{b}_s{s}" for a in (1, 2) for b in (1, 2)
                                  for s in (0, 1)}
    for key, run in res["scored"].items():
        # the encoder is in the loop: images entered as pixels, nothing was generated
        assert run["judge"] is None and 0 <= run["choice_image_to_caption"] <= 1, key
    # the probes trained on subsets of the Noto training set, the grid on all of it
    probes = res["search"]["probes"]
    assert {p["samples"] for p in probes} == {16, 48} and len(probes) == 8
    assert {tuple(p) for p in res["pairs"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert tuple(res["choice"]) in {tuple(p) for p in res["pairs"]}
    assert res["mars_cost"]["steps"] == 8 * 6 + 3
    md = (tmp_path / "results.md").read_text()
    assert "image→caption choice" in md and "(MARS)" in md and "(grid best)" in md
    assert (tmp_path / "mars" / "laws.png").stat().st_size > 0
