"""launch/examples/gpt_plugin.py, the plugin API on a plain GPTModel: the loss falls only if the
modality routing works, and the adapter it saves is complete and loadable."""

import importlib.util
import os

import pytest
import torch

import megalora
from helpers import ROOT
from megalora.testing.dist import run_distributed

EXAMPLE = os.path.join(ROOT, "launch", "examples", "gpt_plugin.py")


def _example():
    spec = importlib.util.spec_from_file_location("gpt_plugin", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(rank, world, argv):
    example = _example()
    return example.train(example.parse(argv))


@pytest.mark.slow
def test_example_trains_and_saves(tmp_path):
    result = run_distributed(2, _train, (["--steps", "25", "--out", str(tmp_path)],))[0]
    losses = result["losses"]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    manifest = megalora.read_manifest(result["adapter"])
    assert manifest["saved_with"] == {"tp": 2, "pp": 1}
    assert len(manifest["tensors"]) == 4 * 4 * 2
    assert manifest["lora_config"]["num_heads"] == 2


def test_synthetic_task_follows_its_rules():
    example = _example()
    tokens, labels, modality = example.synthetic_batch(torch.Generator().manual_seed(0), 3)
    text, image = modality == 0, modality == 1
    assert text.any() and image.any()
    assert torch.equal(labels[text], (tokens[text] + 1) % example.VOCAB)
    assert torch.equal(labels[image], (3 * tokens[image] + 7) % example.VOCAB)
    # within a span each next token follows the span's rule
    for row in range(3):
        for pos in range(example.SEQ - 1):
            if modality[row, pos] == modality[row, pos + 1]:
                assert tokens[row, pos + 1] == labels[row, pos]
