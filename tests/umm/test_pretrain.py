"""``megalora pretrain``: full-parameter training of a small UMM resumes exactly, stops on a
non-finite loss with nothing saved, and its base loads into a LoRA run (every mismatch named)."""

import os

import pytest
import torch
from safetensors.torch import load_file

from megalora.errors import NonFiniteError, UsageError
from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig

pytestmark = pytest.mark.slow  # trains in spawned processes


def _run(out, steps=6, **extra):
    over = ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
            f"train.steps={steps}", f"train.out_dir={out}", "train.save_every=3",
            "train.log_every=100", "train.optimizer=torch", "data.synthetic_samples=64",
            "data.eval_samples=16"] + [f"{k}={v}" for k, v in extra.items()]
    return RunConfig.from_yaml("umm_tiny", over)


def _pretrain(rank, world, run, max_steps=0):
    from megalora.umm.pretrain import pretrain

    return pretrain(run, progress=lambda m: None, max_steps_this_run=max_steps)


def _initial_state(rank, world, run):
    from megalora.umm.model import build_umm
    from megalora.umm.session import parallel_session

    with parallel_session(run):
        torch.manual_seed(run.train.seed)
        return {k: v.detach().clone() for k, v in build_umm(run).state_dict().items()
                if torch.is_tensor(v)}


def test_pretraining_resumes_exactly(tmp_path):
    full = run_distributed(1, _pretrain, (_run(tmp_path / "full"),))[0]
    first = run_distributed(1, _pretrain, (_run(tmp_path / "cut"), 4))[0]
    assert first["base"] is None and os.path.exists(tmp_path / "cut" / "pretrain_state.pt")
    rest = run_distributed(1, _pretrain, (_run(tmp_path / "cut"),))[0]
    assert rest["step"] == 6 and len(rest["losses"]) == 2
    a, b = load_file(full["base"]), load_file(rest["base"])
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not os.path.exists(tmp_path / "cut" / "pretrain_state.pt")  # done: tidied
    assert full["losses"][0]["text"] > full["losses"][-1]["text"]
    # every parameter trained: the base differs from the random init everywhere it is a weight
    init = run_distributed(1, _initial_state, (_run(tmp_path / "init"),))[0]
    changed = [k for k in a if a[k].is_floating_point() and not torch.allclose(a[k], init[k])]
    assert len(changed) > 0.9 * sum(v.is_floating_point() for v in a.values())


def test_non_finite_pretraining_stops_and_saves_nothing(tmp_path):
    with pytest.raises(Exception, match="loss .*lower train.lr") as info:
        run_distributed(1, _pretrain, (_run(tmp_path, **{"train.lr": 1e30,
                                                          "train.warmup_steps": 0}),))
    assert "NonFiniteError" in str(info.value) or isinstance(info.value, NonFiniteError)
    assert not os.path.exists(tmp_path / "base.safetensors")


def _load_into_lora_run(rank, world, run):
    from megalora.umm.session import build_model, parallel_session

    with parallel_session(run) as device:
        model, _ = build_model(run, device)
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if torch.is_tensor(v) and "lora" not in k}


def test_the_base_loads_into_a_lora_run(tmp_path):
    base = run_distributed(1, _pretrain, (_run(tmp_path / "b", steps=2),))[0]["base"]
    lora = _run(tmp_path / "l", **{"model.base_checkpoint": base})
    loaded = run_distributed(1, _load_into_lora_run, (lora,))[0]
    saved = load_file(base)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    bad = _run(tmp_path / "x", **{"model.base_checkpoint": base, "model.ffn_hidden_size": 128})
    with pytest.raises(Exception, match=r"model.ffn_hidden_size=128 but the base .* was "
                                        r"trained with 172: set model.ffn_hidden_size: 172"):
        run_distributed(1, _load_into_lora_run, (bad,))
    with pytest.raises(UsageError, match="does not exist"):
        from megalora.umm.base_checkpoint import load_base
        load_base(None, lora.__class__.from_dict({"model": {"base_checkpoint": "x"}}),
                  str(tmp_path / "missing.safetensors"))


def test_pretraining_refuses_model_parallel_layouts(tmp_path):
    from megalora.umm.pretrain import pretrain

    run = RunConfig.from_yaml("umm_tiny", [f"train.out_dir={tmp_path}"])  # TP=2
    with pytest.raises(UsageError, match="pretraining runs at parallel.tensor_parallel=1"):
        pretrain(run)
