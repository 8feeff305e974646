"""HyDRA's allocations and schedule: knobs -> ranks never exceed the budget (random knobs and
budgets), follow the knobs, and give the uniform rank at neutral knobs; in training at TP=2+SP
and PP=2 every decision stays within the budget on every rank, the ranks agree across ranks,
and the exported rank config builds exactly the parameters counted; resume is exact."""

import json
import random

import pytest
import torch

from helpers import capture_figures, png_summary
from megalora.hydra.allocation import Knobs, Module, parameters, ranks_for, uniform_budget
from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig

DIMS = {"linear_qkv": (64, 192), "linear_proj": (64, 64), "linear_fc1": (64, 344),
        "linear_fc2": (172, 64)}


def _modules(max_rank=8, heads=2, layers=4, vision_layers=2):
    out = []
    for stack, n, k in (("llm.decoder.", layers, heads), ("vision.decoder.", vision_layers, 1)):
        for i in range(n):
            for kind, (din, dout) in DIMS.items():
                part = "self_attention" if kind in ("linear_qkv", "linear_proj") else "mlp"
                r = max_rank if (i + len(kind)) % 3 else max_rank // 2  # varied built ranks
                out.append(Module(f"{stack}layers.{i}.{part}.{kind}", din + k * dout, r))
    return out


def test_allocations_never_exceed_the_budget():
    rng = random.Random(0)
    mods = _modules()
    cheapest = min(m.cost for m in mods)
    for trial in range(300):
        knobs = Knobs.clipped(rng.uniform(-1, 1), rng.random(), rng.random(), rng.random()) \
            if trial % 2 else Knobs(rng.uniform(-1, 1), rng.uniform(0.01, 0.99),
                                    rng.uniform(0.01, 0.99), rng.uniform(0.01, 0.99))
        budget = int(uniform_budget(mods, 1) * rng.uniform(1.0, 9.0))
        r_min = rng.choice([1, 1, 2])
        if r_min * sum(m.cost for m in mods) > budget:
            continue
        ranks = ranks_for(knobs, mods, budget, r_min)
        used = parameters(ranks, mods)
        assert used <= budget, (trial, knobs, used, budget)
        assert all(r_min <= ranks[m.name] <= m.max_rank for m in mods)
        full = all(ranks[m.name] == m.max_rank for m in mods)
        assert full or budget - used < cheapest or \
            all(ranks[m.name] == m.max_rank or m.cost > budget - used for m in mods)


def test_neutral_knobs_give_the_uniform_rank_and_knobs_steer():
    mods = _modules(max_rank=8)
    budget = uniform_budget(mods, 3)
    assert set(ranks_for(Knobs(), mods, budget).values()) == {3}
    mods = _modules(max_rank=16)
    budget = uniform_budget(mods, 4)
    deep = ranks_for(Knobs(slope=0.75), mods, budget)
    for kind in DIMS:  # deeper layers never get less rank than shallower ones, per kind
        col = [v for n, v in sorted(deep.items()) if n.startswith("llm.") and n.endswith(kind)]
        assert col == sorted(col) and col[-1] > col[0], (kind, col)
    attn = ranks_for(Knobs(attention=0.8), mods, budget)
    assert min(v for n, v in attn.items() if "self_attention" in n) > \
        max(v for n, v in attn.items() if ".mlp." in n)
    with pytest.raises(ValueError, match="below the .* parameters of every module at "
                                         "hydra.r_min=2"):
        ranks_for(Knobs(), mods, uniform_budget(mods, 1), r_min=2)


def _run(tmp, steps, parallel, **hydra):
    return RunConfig.from_dict({
        "parallel": parallel, "vision": {"enabled": True},
        "train": {"steps": steps, "out_dir": str(tmp), "log_every": 100, "save_every": 0,
                  "device": "cpu", "warmup_steps": 2, "tensorboard": False},
        "data": {"synthetic_samples": 128, "eval_samples": 16},
        "hydra": {"enabled": True, "every": 4, "explore": 2, "freeze": 0.9, **hydra}})


def _train_worker(rank, world, run, max_steps=0):
    from megalora.umm.train import train

    return train(run, max_steps_this_run=max_steps)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tensor_parallel": 2, "sequence_parallel": True},
                                    {"pipeline_parallel": 2}], ids=["tp2-sp", "pp2"])
def test_schedule_stays_within_the_budget_and_exports_it(tmp_path, layout):
    from megalora.umm.plan import stage_counts

    run = _run(tmp_path, 24, layout)
    results = run_distributed(2, _train_worker, (run,))
    h0, h1 = results[0]["hydra"], results[1]["hydra"]
    assert h0["ranks"] == h1["ranks"] and h0["params"] == h1["params"] <= h0["budget"]
    log = [json.loads(line) for line in open(tmp_path / "hydra.jsonl")]
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20]
    assert all(r["params"] <= r["budget"] == h0["budget"] for r in log)
    assert len({json.dumps(r["ranks"], sort_keys=True) for r in log}) > 1  # it did reallocate
    # the budget is the uniform half-rank model's parameter count, counted independently
    uniform = RunConfig.from_dict({**run.to_dict(), "lora": {**run.to_dict()["lora"],
                                                             "rank": run.lora.rank // 2}})
    assert h0["budget"] == stage_counts(uniform, tp=1, pp=1, stage=0).lora
    exported = RunConfig.from_yaml(h0["config"])
    assert not exported.hydra.enabled
    assert stage_counts(exported, tp=1, pp=1, stage=0).lora == h0["params"]
    # the heatmap file: 2 stacks + the over-time panel, 5 x 4.8 in each at 100 dpi, the ranks
    # drawn in colour (measured: 42 % of the pixels; 0 % with empty axes); its content is
    # checked by test_allocation_heatmap_draws_the_logged_ranks
    png = png_summary(h0["plot"])
    assert png["size"] == (1500, 480) and png["colour"] > 0.1, png


def test_allocation_heatmap_draws_the_logged_ranks(tmp_path, monkeypatch):
    """Each stack's panel is its final ranks (layers x kinds); the last panel every module's
    rank at each decision, modules in name order."""
    import numpy as np

    from megalora.hydra.report import heatmap

    rng = random.Random(0)
    names = sorted(m.name for m in _modules())
    log = [{"step": step, "ranks": {n: rng.randint(0, 8) for n in names}}
           for step in (0, 4, 8, 12)]
    figures = capture_figures(monkeypatch)
    heatmap(log, str(tmp_path / "h.png"), budget_rank=4)
    fig = figures["h.png"]
    *panels, over_time, _colorbar = fig.axes
    final = log[-1]["ranks"]
    kinds = sorted(DIMS)
    for ax, stack, layers in zip(panels, ("llm.decoder.", "vision.decoder."), (4, 2)):
        want = np.full((layers, len(kinds)), np.nan)
        for n, k in final.items():
            if n.startswith(stack):
                want[int(n.split(".")[3]), kinds.index(n.rsplit(".", 1)[1])] = k
        np.testing.assert_array_equal(np.ma.filled(ax.images[0].get_array(), np.nan), want)
        assert ax.get_title() == f"{stack.rstrip('.')}: final ranks (uniform 4)"
    np.testing.assert_array_equal(over_time.images[0].get_array(),
                                  [[r["ranks"][n] for r in log] for n in names])
    assert [t.get_text() for t in over_time.get_xticklabels()] == ["0", "4", "8", "12"]


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_hydra_resume_is_exact(tmp_path):
    layout = {"tensor_parallel": 1, "sequence_parallel": False}
    full = _run(tmp_path / "full", 16, layout)
    run_distributed(1, _train_worker, (full,))
    split = _run(tmp_path / "split", 16, layout)
    first = run_distributed(1, _train_worker, (split, 6))[0]  # mid-window, after 1 decision
    assert first["stopped_early"] and first["step"] == 6
    run_distributed(1, _train_worker, (split,))
    a = _adapter(tmp_path / "full" / "adapter.safetensors")
    b = _adapter(tmp_path / "split" / "adapter.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-7), key
    logs = [[json.loads(x) for x in open(p / "hydra.jsonl")] for p in
            (tmp_path / "full", tmp_path / "split")]
    assert [r["ranks"] for r in logs[0]] == [r["ranks"] for r in logs[1]]
    assert [r["step"] for r in logs[1]] == [4, 8, 12]


@pytest.mark.parametrize("hydra, message", [
    ({"budget_rank": 9}, r"hydra.budget_rank=9 must be in \[1, lora.rank=8\]"),
    ({"budget_rank": 2, "r_min": 3}, r"hydra.r_min=3 must be in \[1, budget rank 2\]"),
    ({"every": 0}, "hydra.every"),
])
def test_hydra_config_errors(tmp_path, hydra, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, 8, {}, **hydra)


def test_gradual_moves_stay_within_the_budget():
    from megalora.hydra.allocation import step_toward

    rng = random.Random(1)
    mods = _modules(max_rank=8)
    budget = uniform_budget(mods, 4)
    current = ranks_for(Knobs(), mods, budget)
    for _ in range(100):
        target = ranks_for(Knobs.clipped(rng.uniform(-1, 1), rng.random(), rng.random(),
                                         rng.random()), mods, budget)
        limit = rng.choice([0, 1, 2])
        nxt = step_toward(current, target, mods, budget, limit)
        assert parameters(nxt, mods) <= budget
        for n in nxt:
            lo, hi = sorted((current[n], target[n]))
            assert lo <= nxt[n] <= hi  # toward the target, never past it
            assert limit == 0 or abs(nxt[n] - current[n]) <= limit
        if limit == 0:
            assert nxt == target
        current = nxt
