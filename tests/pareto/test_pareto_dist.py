"""Pareto LoRA across layouts: the per-group Gram matrices and the combined adapter gradient
at TP=2, TP=2+SP, PP=2 and DP=2 equal a single process's; with the ``sum`` rule the combined
gradient is vanilla LoRA's; the trainer runs the exact and cheap modes, logs and resumes."""

import json

import pytest
import torch

from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig


def _run(tmp, parallel=None, pareto=None, **train):
    return RunConfig.from_dict({
        "parallel": parallel or {},
        "lora": {"rank": 4, "num_heads": 2, "routing": "modality", "init_b": "gaussian",
                 "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
        "data": {"synthetic_samples": 64, "eval_samples": 16},
        "pareto": {"mode": "exact", "rule": "pareto", "tau": 2.0, **(pareto or {})},
        "train": {"steps": 4, "out_dir": str(tmp), "device": "cpu", "log_every": 100,
                  "save_every": 0, "warmup_steps": 1, "tensorboard": False, **train}})


def _grads_worker(rank, world, run, microbatches):
    """One exact Pareto step's gradients on fixed data: DP rank d takes its slice of the
    microbatches. Returns the Gram matrices, weights and the full combined gradients."""
    from megatron.core import parallel_state as ps

    from megalora.grads import full_lora_grads
    from megalora.pareto.hook import ParetoHook
    from megalora.umm.data import DataStream
    from megalora.umm.session import TrainingSession, parallel_session

    with parallel_session(run) as device:
        session = TrainingSession.build(run, device)
        hook = ParetoHook(run)
        hook.setup(session)
        data = session.stream.dataset
        stream = DataStream(data, micro_batch_size=run.train.micro_batch_size,
                            seq_length=run.data.seq_length, special=data.special, seed=0)
        batches = [stream.next_batch() for _ in range(microbatches)]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = microbatches // dp
        mine = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        session.optimizer.zero_grad()
        hook.forward_backward(1, session, mine)
        grads = {k: v.clone() for k, v in full_lora_grads(session.model).items()}
        last = hook.engine.last
        return {"gram": last["gram"], "weights": last["weights"], "fired": last["fired"],
                "grads": grads}


def _merged(results):
    out = {}
    for r in results:
        out.update(r["grads"])
    return out


THREE = ["lm", "caption", "image"]  # text split by whether an image precedes it
LAYOUTS = {
    "tp2": ({"tensor_parallel": 2}, {"groups": "layer"}),
    "tp2-sp": ({"tensor_parallel": 2, "sequence_parallel": True}, {"groups": "layer_group:2"}),
    "pp2": ({"pipeline_parallel": 2}, {"groups": "module"}),
    "dp2": ({}, {"groups": "layer"}),
    "tp2-sp-3-objectives": ({"tensor_parallel": 2, "sequence_parallel": True},
                            {"groups": "layer", "objectives": THREE}),
    "tp2-sp-balance": ({"tensor_parallel": 2, "sequence_parallel": True},
                       {"groups": "layer", "rule": "balance"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gram_and_combined_gradient_match_one_process(tmp_path, name):
    parallel, pareto = LAYOUTS[name]
    ref = run_distributed(1, _grads_worker, (_run(tmp_path / "one", None, pareto), 4))[0]
    got = run_distributed(2, _grads_worker, (_run(tmp_path / name, parallel, pareto), 4))
    gram_ref = torch.tensor(ref["gram"])
    for r in got:  # every rank agrees on the Gram matrices and the weights
        gram = torch.tensor(r["gram"])
        assert torch.allclose(gram, gram_ref, rtol=2e-5, atol=1e-9 * gram_ref.abs().max()), \
            (gram, gram_ref)
        assert r["fired"] == ref["fired"]
        assert torch.allclose(torch.tensor(r["weights"]), torch.tensor(ref["weights"]),
                              rtol=1e-4)
    assert len(set(ref["fired"])) >= 1
    k = len(pareto.get("objectives", ["text", "image"]))
    assert gram_ref.shape[1:] == (k, k) and gram_ref.diagonal(dim1=1, dim2=2).amax(0).min() > 0
    full = _merged(got)
    assert set(full) == set(ref["grads"])
    for key, value in ref["grads"].items():
        scale = value.abs().max().item()
        assert torch.allclose(full[key], value, rtol=1e-4, atol=1e-5 * max(scale, 1e-6)), key


@pytest.mark.slow
@pytest.mark.parametrize("objectives", [["text", "image"], THREE])
def test_sum_rule_is_vanilla_lora(tmp_path, objectives):
    """Per-objective passes combined with weights 1 = one pass on the summed loss (for three
    objectives this also checks that lm + caption is the text loss)."""
    run = _run(tmp_path, {"tensor_parallel": 2, "sequence_parallel": True},
               {"rule": "sum", "objectives": objectives})
    got = _merged(run_distributed(2, _grads_worker, (run, 2)))
    vanilla = RunConfig.from_dict({**run.to_dict(), "pareto": {"mode": "off"}})
    ref = _merged(run_distributed(2, _vanilla_worker, (vanilla, 2)))
    for key, value in ref.items():  # float32: (g_text + g_image) vs grad of the sum
        assert torch.allclose(got[key], value, rtol=1e-4,
                              atol=1e-6 * value.abs().max().item()), key


def _vanilla_worker(rank, world, run, microbatches):
    from megalora.grads import full_lora_grads
    from megalora.umm.data import DataStream
    from megalora.umm.session import TrainingSession, parallel_session

    with parallel_session(run) as device:
        session = TrainingSession.build(run, device)
        data = session.stream.dataset
        stream = DataStream(data, micro_batch_size=run.train.micro_batch_size,
                            seq_length=run.data.seq_length, special=data.special, seed=0)
        session.optimizer.zero_grad()
        session.forward_backward([stream.next_batch() for _ in range(microbatches)])
        session.optimizer.reduce()
        return {"grads": {k: v.clone() for k, v in full_lora_grads(session.model).items()}}


def _train_worker(rank, world, run, max_steps=0):
    from megalora.umm.train import train

    return train(run, max_steps_this_run=max_steps)


@pytest.mark.slow
def test_trainer_cheap_mode_logs_and_resumes_exactly(tmp_path):
    """Cheap mode (exact every 2 steps): history written, resume mid-run (the cheap loss
    weights come back from the checkpoint) reaches the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    layout = {"tensor_parallel": 2, "sequence_parallel": True}
    pareto = {"mode": "cheap", "every": 2}
    full = run_distributed(2, _train_worker, (_run(tmp_path / "a", layout, pareto),))[0]
    assert [s["step"] for s in full["pareto"]] == [1, 3]
    rows = [json.loads(x) for x in open(tmp_path / "a" / "pareto.jsonl")]
    assert [r["step"] for r in rows] == [1, 3] and rows[0]["groups"][0] == "layer0"
    run_b = _run(tmp_path / "b", layout, pareto, save_every=2)
    run_distributed(2, _train_worker, (run_b, 2))  # stops after step 2 (a cheap step follows)
    resumed = run_distributed(2, _train_worker, (run_b,))[0]
    assert resumed["step"] == 4
    rows = [json.loads(x) for x in open(tmp_path / "b" / "pareto.jsonl")]
    assert [r["step"] for r in rows] == [1, 3]  # resuming appends to the history, once
    a, b = load_file(full["adapter"]), load_file(resumed["adapter"])
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


@pytest.mark.slow
def test_gradnorm_in_the_trainer_pp2_equals_one_process_and_resumes(tmp_path):
    """GradNorm learns from the losses, which only the last pipeline stage computes: at PP=2
    every rank must take the same weights, and the run (interrupted after step 2, resumed,
    GradNorm's Adam state coming back from state.json) must reach one process's adapter."""
    from safetensors.torch import load_file

    pareto = {"rule": "gradnorm", "groups": "layer", "gradnorm_lr": 0.2}
    one = run_distributed(1, _train_worker, (_run(tmp_path / "one", None, pareto),))[0]
    run = _run(tmp_path / "pp2", {"pipeline_parallel": 2}, pareto, save_every=2)
    run_distributed(2, _train_worker, (run, 2))
    resumed = run_distributed(2, _train_worker, (run,))
    assert resumed[0]["step"] == 4
    weights = [[r["weights"][0] for r in rank["pareto"]] for rank in resumed]
    assert weights[0] == weights[1]  # both stages, the same learned weights
    ref = [r["weights"][0] for r in one["pareto"]][2:]
    assert torch.allclose(torch.tensor(weights[0]), torch.tensor(ref), rtol=1e-5)
    assert abs(ref[-1][0] - 1.0) > 1e-3  # it learned something by step 4
    a, b = load_file(one["adapter"]), load_file(resumed[0]["adapter"])
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_pareto_config_errors():
    assert RunConfig.from_yaml("launch/configs/umm_tiny.yaml", ["pareto.mode=off"]).pareto.mode \
        == "off"  # YAML reads a bare off as false
    with pytest.raises(ValueError, match="pareto.mode must be off, exact or cheap"):
        RunConfig.from_dict({"pareto": {"mode": "fast"}})
    with pytest.raises(ValueError, match="pareto.rule must be one of"):
        RunConfig.from_dict({"pareto": {"rule": "nash"}})
    with pytest.raises(ValueError, match="pareto.rule=fixed needs pareto.fixed_weights"):
        RunConfig.from_dict({"pareto": {"rule": "fixed"}})
    with pytest.raises(ValueError, match=r"layer_group:9.*num_layers=4"):
        RunConfig.from_dict({"pareto": {"groups": "layer_group:9"}})
    with pytest.raises(ValueError, match="use model, layer, layer_group:N or module"):
        RunConfig.from_dict({"pareto": {"groups": "block"}})
    with pytest.raises(ValueError, match=r"pareto.objectives must be \[text, image\]"):
        RunConfig.from_dict({"pareto": {"objectives": ["text", "caption", "image"]}})
    with pytest.raises(ValueError, match="fixed_weights with 3 numbers"):
        RunConfig.from_dict({"pareto": {"rule": "fixed", "objectives": THREE,
                                        "fixed_weights": [1, 1]}})
    with pytest.raises(ValueError, match="pareto.tau must be >= 1"):
        RunConfig.from_dict({"pareto": {"tau": 0.5}})
