"""The trainer-hook protocol (megalora.umm.hooks): a method written in this test, not known to
the trainer, changes the gradients at TP=2 + SP and resumes exactly."""

import os

import pytest
import torch

import megalora
from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig
from megalora.umm.hooks import TrainerHook, gradient_hook

pytestmark = pytest.mark.slow  # trains at TP=2+SP


class FreezeImageHead(TrainerHook):
    """Zero the image head's (head 1's) B gradients every step, and count the steps: its
    state must survive a resume."""

    name = "freeze_image_head"

    def __init__(self):
        self.calls = 0

    def before_optimizer_step(self, step, session):
        for item in megalora.lora_parameters(session.model):
            if item.factor == "lora_B":
                megalora.grad_of(item.param)[1].zero_()
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state, step):
        if state is None:
            raise ValueError("this checkpoint was saved without freeze_image_head")
        self.calls = state["calls"]

    def progress(self):
        return f"frozen {self.calls}"

    def finish(self, session, completed):
        return self.calls


def _run(tmp, steps):
    return RunConfig.from_dict({
        "parallel": {"tensor_parallel": 2, "sequence_parallel": True},
        "train": {"steps": steps, "out_dir": str(tmp), "log_every": 100, "save_every": 0,
                  "device": "cpu", "warmup_steps": 2, "tensorboard": False},
        "data": {"synthetic_samples": 64, "eval_samples": 0},
        "lora": {"num_heads": 2, "routing": "modality", "dropout": 0.1}})


def _worker(rank, world, run, max_steps):
    from megalora.umm.train import train

    return train(run, max_steps_this_run=max_steps, hooks=[FreezeImageHead()])


def _adapter(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_a_test_written_hook_changes_gradients_and_resumes_exactly(tmp_path):
    full = run_distributed(2, _worker, (_run(tmp_path / "full", 8), 0))[0]
    assert full["freeze_image_head"] == 8
    first = run_distributed(2, _worker, (_run(tmp_path / "split", 8), 4))[0]
    assert first["stopped_early"] and first["freeze_image_head"] == 4
    second = run_distributed(2, _worker, (_run(tmp_path / "split", 8), 0))[0]
    assert second["freeze_image_head"] == 8  # 4 restored from the checkpoint + 4 more
    a = _adapter(os.path.join(tmp_path / "full", "adapter.safetensors"))
    b = _adapter(os.path.join(tmp_path / "split", "adapter.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-7), key
    heads = [v for k, v in a.items() if k.endswith("lora_B")]
    assert all(torch.count_nonzero(v[1]) == 0 for v in heads)  # the hook froze head 1 at 0
    assert all(v[0].abs().max() > 0 for v in heads)  # head 0 trained


class _Producer(TrainerHook):
    def forward_backward(self, step, session, batches):
        return session.forward_backward(batches)


def test_one_gradient_producer_and_unique_names():
    a, b = _Producer(), _Producer()
    a.name, b.name = "a", "b"
    assert gradient_hook([a, FreezeImageHead()]) is a
    with pytest.raises(ValueError, match="each produce the step's gradients"):
        gradient_hook([a, b])
    with pytest.raises(ValueError, match="unique"):
        gradient_hook([FreezeImageHead(), FreezeImageHead()])
