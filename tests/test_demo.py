"""The README's main job, shortened: the loss falls and the adapter is saved and loadable."""

import dataclasses

import pytest

import megalora
from megalora.demo import DemoConfig, synthetic_batch
from megalora.testing.dist import run_distributed


def _run(rank, world, cfg):
    from megalora.demo import run

    return run(cfg)


def test_demo_trains_and_saves(tmp_path):
    cfg = DemoConfig.from_yaml("launch/configs/gpt_tiny.yaml",
                               ["train.steps=25", f"train.out_dir={tmp_path}"])
    result = run_distributed(2, _run, (cfg,))[0]
    losses = result["losses"]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    manifest = megalora.read_manifest(result["adapter"])
    assert manifest["saved_with"] == {"tp": 2, "pp": 1}
    assert len(manifest["tensors"]) == 4 * 4 * 2


def test_synthetic_task_follows_its_rules():
    import torch

    b = synthetic_batch(torch.Generator().manual_seed(0), 3, 32, 64)
    text, image = b.head_ids == 0, b.head_ids == 1
    assert text.any() and image.any()
    assert torch.equal(b.labels[text], (b.tokens[text] + 1) % 64)
    assert torch.equal(b.labels[image], (3 * b.tokens[image] + 7) % 64)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {steps: 3}\n")
    with pytest.raises(ValueError, match=r"unknown sections \['trian'\]"):
        DemoConfig.from_yaml(str(bad))
    with pytest.raises(ValueError, match=r"unknown train field\(s\) \['step'\]"):
        DemoConfig.from_yaml("launch/configs/gpt_tiny.yaml", ["train.step=3"])
    with pytest.raises(ValueError, match="sequence_parallel needs"):
        DemoConfig.from_yaml("launch/configs/gpt_tiny.yaml", ["parallel.tensor_parallel=1"])
    cfg = DemoConfig.from_yaml("launch/configs/gpt_tiny.yaml")
    with pytest.raises(ValueError, match="train.steps"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=0))
