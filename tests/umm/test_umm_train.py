"""The UMM trainer on CPU: both losses fall at TP=2+SP and PP=2, resume is exact, SIGTERM saves
and exits cleanly, the in-loop vision encoder trains, and layouts agree on the losses."""

import glob
import os

import pytest
import torch

from helpers import HeldOutAtStart, context_free_losses
from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig


def _run(tmp, steps, **over):
    raw = {"parallel": over.pop("parallel", {}),
           "train": {"steps": steps, "out_dir": str(tmp), "log_every": 100, "save_every": 0,
                     "device": "cpu", "warmup_steps": 3, **over.pop("train", {})},
           "data": {"synthetic_samples": 256, "eval_samples": 32, **over.pop("data", {})},
           **over}
    return RunConfig.from_dict(raw)


def _train_worker(rank, world, run, max_steps=0):
    from megalora.umm.train import train

    return train(run, max_steps_this_run=max_steps)


def _train_from_scratch_worker(rank, world, run):
    from megalora.umm.train import train

    return train(run, hooks=[HeldOutAtStart()])


def _assert_learned(result, run, what):
    """Both held-out losses below the untrained model's and below the context-free losses
    (helpers.context_free_losses): the adapters learned the data's rules, not token
    frequencies or the average feature."""
    trained, untrained = result["eval"], result["held_out_at_start"]
    free = context_free_losses(run)
    for key in ("text", "image"):
        assert trained[key] < min(untrained[key], free[key]), \
            (what, key, trained[key], untrained[key], free[key])


@pytest.mark.slow
def test_both_losses_fall(tmp_path):
    """40 steps at TP=2+SP and at PP=2 from the same init and data: both beat the baselines and
    reach the same held-out losses (measured: text 2.0934 and image 0.3704 in both layouts, to
    ~1e-8; untrained 5.154 / 1.579; context-free 4.139 / 1.018)."""
    held_out = {}
    for name, layout in (("tp2-sp", {"tensor_parallel": 2, "sequence_parallel": True}),
                         ("pp2", {"pipeline_parallel": 2})):
        run = _run(tmp_path / name, 40, parallel=layout)
        result = run_distributed(2, _train_from_scratch_worker, (run,))[0]
        _assert_learned(result, run, name)
        held_out[name] = result["eval"]
        events = glob.glob(os.path.join(tmp_path, name, "tensorboard", "events.*"))
        assert events, "no TensorBoard event file"
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        tags = EventAccumulator(events[0]).Reload().Tags()["scalars"]
        assert {"loss/text", "loss/image", "eval/text", "eval/image"} <= set(tags)
    for key in ("text", "image"):
        assert held_out["pp2"][key] == pytest.approx(held_out["tp2-sp"][key], rel=1e-5), key


def _adapter(path):
    from safetensors.torch import load_file
    return load_file(path)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    layout = {"tensor_parallel": 2, "sequence_parallel": True}
    full = _run(tmp_path / "full", 12, parallel=layout, lora={"num_heads": 2,
                "routing": "modality", "dropout": 0.1})
    run_distributed(2, _train_worker, (full,))
    split = _run(tmp_path / "split", 12, parallel=layout, lora={"num_heads": 2,
                 "routing": "modality", "dropout": 0.1})
    first = run_distributed(2, _train_worker, (split, 5))[0]
    assert first["stopped_early"] and first["step"] == 5
    second = run_distributed(2, _train_worker, (split,))[0]
    assert not second["stopped_early"] and second["losses"]  # continued from step 5
    a = _adapter(os.path.join(tmp_path / "full", "adapter.safetensors"))
    b = _adapter(os.path.join(tmp_path / "split", "adapter.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-7), key


def _sigterm_worker(rank, world, run):
    import signal
    import threading

    from megalora.umm.train import train

    if rank == 0:  # preemption hits one rank; every rank must stop at the same step
        threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    return train(run)


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(tmp_path):
    run = _run(tmp_path, 10_000, parallel={"tensor_parallel": 2})
    results = run_distributed(2, _sigterm_worker, (run,))
    assert all(r["stopped_early"] for r in results)
    assert results[0]["step"] == results[1]["step"] < 10_000
    from megalora.umm.run_checkpoint import latest_checkpoint
    assert latest_checkpoint(str(tmp_path)).endswith(f"step_{results[0]['step']:06d}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "eva"])
def test_in_loop_vision_encoder_trains_with_its_own_lora(tmp_path, kind):
    run = _run(tmp_path, 30, vision={"enabled": True, "kind": kind},
               lora={"num_heads": 2, "routing": "modality",
                     "target_modules": ["linear_qkv", "linear_proj", "linear_fc1",
                                        "linear_fc2"]})
    assert "vision.*" in run.lora.single_head_modules
    result = run_distributed(1, _train_from_scratch_worker, (run,))[0]
    _assert_learned(result, run, "in-loop vision")
    adapter = _adapter(result["adapter"])
    vision_b = [v for k, v in adapter.items() if k.startswith("vision.") and k.endswith("lora_B")]
    assert vision_b and all(v.shape[0] == 1 for v in vision_b)  # one head in the encoder
    assert any(v.abs().max() > 0 for v in vision_b)  # the encoder's adapters learned


def _step_losses(rank, world, run):
    import megalora
    from megatron.core import parallel_state as ps

    from megalora.umm.optim import loss_scalars
    from megalora.umm.session import build_datasets, build_streams, forward_backward
    from megalora.umm.model import build_umm

    p = run.parallel
    ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor_parallel,
                                 pipeline_model_parallel_size=p.pipeline_parallel)
    model = build_umm(run)
    megalora.apply_lora(model, run.lora)
    stream, _ = build_streams(run, *build_datasets(run))
    stats = loss_scalars(forward_backward(model, run, [stream.next_batch()
                                                        for _ in range(2)]))
    megalora.finalize_lora_grads(model)
    from megalora.grads import full_lora_grads
    return stats, full_lora_grads(model)


@pytest.mark.slow
def test_layouts_agree_on_losses_and_gradients(tmp_path):
    lora = {"num_heads": 2, "routing": "modality", "init_b": "gaussian", "dropout": 0.1}
    ref, ref_grads = run_distributed(1, _step_losses, (_run(tmp_path, 1, lora=lora),))[0]
    for layout in ({"tensor_parallel": 2, "sequence_parallel": True}, {"pipeline_parallel": 2}):
        results = run_distributed(2, _step_losses, (_run(tmp_path, 1, parallel=layout,
                                                         lora=lora),))
        stats = next(s for s, _ in results if s is not None)
        for key in ("text", "image"):
            assert stats[key] == pytest.approx(ref[key], rel=1e-5), (layout, key)
        grads = {}
        for _, g in results:
            grads.update(g)
        assert sorted(grads) == sorted(ref_grads)
        for key, value in ref_grads.items():
            assert torch.allclose(grads[key], value, rtol=1e-4,
                                  atol=1e-4 * value.abs().max().item()), (layout, key)


@pytest.mark.parametrize("raw, message", [
    ({"parallel": {"tensor_parallel": 3}}, r"parallel.tensor_parallel=3 must divide"),
    ({"parallel": {"pipeline_parallel": 3}}, r"parallel.pipeline_parallel=3 must divide "
                                             r"model.num_layers=4"),
    ({"data": {"seq_length": 6}}, r"data.seq_length=6 cannot hold one image"),
    ({"data": {"seq_length": 128}}, r"data.seq_length=128 exceeds model.max_seq_length=64"),
    ({"model": {"hidden_sz": 64}}, r"unknown model field\(s\) \['hidden_sz'\]"),
    ({"vision": {"enabled": True, "hidden_size": 32}}, r"vision.hidden_size=32 must equal "
                                                       r"model.visual_dim=16"),
    ({"parallel": {"sequence_parallel": True}}, r"sequence_parallel needs"),
    ({"train": {"min_lr": 1.0}}, r"train.min_lr=1.0"),
    ({"trian": {}}, r"unknown config section\(s\) \['trian'\]"),
])
def test_impossible_configs_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(raw)


def test_dataset_that_does_not_match_the_model(tmp_path):
    from megalora.umm.synthetic import SyntheticSpec, write_synthetic
    from megalora.umm.session import build_datasets

    write_synthetic(SyntheticSpec(num_samples=8, visual_dim=8), str(tmp_path / "data"))
    run = RunConfig.from_dict({"data": {"path": str(tmp_path / "data")}})
    with pytest.raises(ValueError, match="model.visual_dim"):
        build_datasets(run)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tensor_parallel": 2, "sequence_parallel": True},
                                    {"pipeline_parallel": 2}], ids=["tp2-sp", "pp2"])
def test_megatron_and_torch_optimizers_agree(tmp_path, layout):
    """megatron-core's DDP + optimizer and megalora's AdamW-on-masters take the same steps."""
    adapters = {}
    for name in ("megatron", "torch"):
        run = _run(tmp_path / name, 8, parallel=layout, train={"optimizer": name})
        result = run_distributed(2, _train_worker, (run,))[0]
        adapters[name] = _adapter(result["adapter"])
    for key, value in adapters["torch"].items():
        assert torch.allclose(adapters["megatron"][key], value, rtol=1e-4,
                              atol=1e-5 * max(1.0, value.abs().max().item())), key


def _held_out(rank, world, run, adapter):
    """The held-out losses of the untrained model (adapters as initialised: B = 0) and with the
    adapter file loaded, on the same batches, in a process of its own."""
    import megalora
    from megalora.umm.session import (build_datasets, build_model, build_streams, evaluate,
                                      parallel_session)

    with parallel_session(run) as device:
        model, _ = build_model(run, device)
        _, evals = build_streams(run, *build_datasets(run))
        start = evals.state_dict()
        untrained = evaluate(model, run, evals, device)
        megalora.load_adapter(model, adapter)
        evals.load_state_dict(start)
        return untrained, evaluate(model, run, evals, device)


@pytest.mark.slow
def test_main_job_command_runs(tmp_path):
    """The README's main job as a user runs it (torchrun + the megalora CLI + umm_tiny.yaml),
    shortened: per-modality losses and an ETA are logged, the adapter is written, and the
    held-out losses it prints are those of the adapter it saved (evaluated again at TP=1), below
    the untrained model's."""
    import re
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "megalora",
           "train", "--config", "launch/configs/umm_tiny.yaml", "train.resume=false",
           "train.steps=10", "train.log_every=5", f"train.out_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [x for x in done.stdout.splitlines() if x.startswith("step ")]
    assert [int(x.split()[1]) for x in lines] == [1, 5, 10], done.stdout
    assert all(" text " in x and " image " in x and "ETA" in x for x in lines), done.stdout
    printed = re.search(r"held-out: text ([\d.]+)  image ([\d.]+)", done.stdout)
    assert printed, done.stdout
    adapter = os.path.join(tmp_path, "adapter.safetensors")
    assert f"adapter saved to {adapter}" in done.stdout
    run = RunConfig.from_yaml("launch/configs/umm_tiny.yaml", [
        "parallel.tensor_parallel=1", "parallel.sequence_parallel=false"])
    untrained, trained = run_distributed(1, _held_out, (run, adapter))[0]
    for i, key in enumerate(("text", "image")):
        # printed to 4 decimals; TP=2+SP and TP=1 agree to ~1e-6
        assert abs(float(printed[i + 1]) - trained[key]) <= 6e-5, (key, printed[0], trained)
        assert trained[key] < untrained[key], (key, trained, untrained)


@pytest.mark.slow
def test_image_loss_conventions(tmp_path):
    """``mse_sum`` is ``mse`` times visual_dim on the same init and batches (text unchanged),
    and the convention is the line the trainer logs."""
    from megalora.umm.model import loss_convention

    runs = {kind: _run(tmp_path / kind, 1, model={"image_loss": kind})
            for kind in ("mse", "mse_sum")}
    (mean, _), (summed, _) = [run_distributed(1, _step_losses, (runs[k],))[0]
                              for k in ("mse", "mse_sum")]
    dim = runs["mse"].model.visual_dim
    assert summed["image"] == pytest.approx(dim * mean["image"], rel=1e-5)
    assert summed["text"] == mean["text"]
    assert loss_convention(runs["mse"]) == (
        "losses: text cross-entropy (mean over text targets) x 1 + image per-element MSE "
        f"(mean over visual_dim={dim}) per predicted slot (mean over slots) x 1")
    with pytest.raises(ValueError, match="model.image_loss must be one of mse, mse_sum, cosine"):
        _run(tmp_path / "bad", 1, model={"image_loss": "l1"})
