"""The synthetic toy's experiment scripts (launch/experiments/*_tiny.py), reduced to a few
steps: each runs end to end on the shared experiment code and writes its results; the full
runs and their figures are in docs/experiments.md."""

import json
import os
import re
import sys

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launch", "experiments"))


def test_pareto_tiny_reduced(tmp_path):
    import pareto_tiny

    args = ["--steps", "2", "--seeds", "0", "1", "--variants", "vanilla", "pareto_exact",
            "--out", str(tmp_path)]
    assert pareto_tiny.main(args) == 0
    res = json.load(open(tmp_path / "results.json"))
    assert set(res["runs"]) == {f"{v}_s{s}" for v in ("vanilla", "pareto_exact") for s in (0, 1)}
    summary = res["summary"]
    assert summary["vanilla"]["image"]["diff"] == 0.0  # paired against itself
    # same seed, same init and data: only the rule differs, and it changes the update
    assert summary["pareto_exact"]["image"]["values"] != summary["vanilla"]["image"]["values"]
    assert all(r["steps"] == 2 and r["image"] > 0 for r in res["runs"].values())
    rows = [json.loads(x) for x in open(tmp_path / "pareto_exact_s1" / "pareto.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]  # exact: both gradients every step
    assert "| pareto_exact |" in (tmp_path / "results.md").read_text()


def test_hydra_tiny_reduced(tmp_path):
    import hydra_tiny

    args = ["--steps", "4", "--every", "1", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert hydra_tiny.main(args) == 0
    res = json.load(open(tmp_path / "results.json"))
    summary = res["summary"]
    # the masked control reproduces uniform ranks (same first ranks of the factors, same scale)
    for key in ("image", "text"):
        assert summary["masked"][key]["values"] == pytest.approx(
            summary["uniform"][key]["values"], rel=1e-5), key
    assert {res["runs"][f"final_s{s}"]["steps"] for s in (0, 1)} == {4}
    assert "Adapter parameters HyDRA ended with" in (tmp_path / "results.md").read_text()


def test_mars_tiny_reduced(tmp_path, capsys):
    import mars_tiny

    args = ["--steps", "3", "--ranks", "1", "2", "--budget", "uniform:2", "--probe-steps", "3",
            "--probe-samples", "8", "16", "--every", "1", "--out", str(tmp_path)]
    assert mars_tiny.main(args) == 0
    out = capsys.readouterr().out
    pick = re.search(r"MARS: r_v=(\d+), r_l=(\d+)", out)
    assert pick and {int(pick[1]), int(pick[2])} <= {1, 2}
    assert "Grid's best within the budget" in out and "cheaper in sequences" in out
    assert (tmp_path / "results.md").exists()
