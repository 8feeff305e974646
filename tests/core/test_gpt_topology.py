"""A real megatron-core GPT (4 layers, hidden 64) with LoRA on qkv/proj/fc1/fc2 takes one
training step through Megatron's schedules; every topology must reproduce the single process:
the same loss, the same full-size LoRA gradients and the same updated adapter."""

import pytest
import torch

from gpt_cases import VARIANTS, lora_step, merged
from helpers import assert_dicts_close
from megalora.testing.dist import run_distributed

pytestmark = pytest.mark.slow  # every test spawns a gloo world and runs GPT steps

TOPOLOGIES = {  # name: (tp, pp, sp)
    "tp2": (2, 1, False), "tp2-sp": (2, 1, True), "pp2": (1, 2, False),
    "tp2-pp2": (2, 2, False), "tp2-pp2-sp": (2, 2, True),
}


def _worker(rank, world, tp, pp, sp):
    return {v: lora_step(tp, pp, sp, v) for v in VARIANTS}


@pytest.fixture(scope="module")
def single_process():
    return run_distributed(1, _worker, (1, 1, False))[0]


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_topology_equals_single_process(single_process, topology):
    tp, pp, sp = TOPOLOGIES[topology]
    results = run_distributed(tp * pp, _worker, (tp, pp, sp))
    for variant, ref in single_process.items():
        runs = [r[variant] for r in results]
        # PP-only layouts run the very same float32 cross-entropy: bitwise equal
        rtol = 0.0 if tp == 1 else 1e-6
        for run in runs:
            assert run["loss"] == pytest.approx(ref["loss"], rel=rtol, abs=0), variant
        assert_dicts_close(merged(runs, "grads"), ref["grads"], rtol, what=f"{variant} grads")
        assert_dicts_close(merged(runs, "adapter"), ref["adapter"], rtol * 1e-2,
                           what=f"{variant} adapter")
        if tp > 1:  # replicated factors stay bitwise identical on every TP rank
            by_stage = {}
            for rank, run in enumerate(runs):
                by_stage.setdefault(rank // tp, []).append(run["replicated"])
            for reps in by_stage.values():
                for key in reps[0]:
                    assert torch.equal(reps[0][key], reps[1][key]), key
        if sp:  # sensitivity: without the TP sum of replicated-factor grads the test must fail
            with pytest.raises(AssertionError):
                assert_dicts_close(merged(runs, "partial"), ref["grads"], 1e-3, what="no-sum")


def _recompute_worker(rank, world, tp, pp, sp, tape):
    return lora_step(tp, pp, sp, "modality", recompute=True, tape=tape)


@pytest.mark.parametrize("topology", ["single", "pp2", "tp2-pp2-sp"])
def test_full_activation_recompute(single_process, topology):
    """Megatron's full recompute re-runs each layer during backward, after later microbatches
    changed the head ids and dropout counter (1F1B); the layers replay what they used. At PP=1
    the frozen embedding would otherwise leave the checkpointed layers without backward."""
    tp, pp, sp = {"single": (1, 1, False), **TOPOLOGIES}[topology]
    ref = single_process["modality"]
    runs = run_distributed(tp * pp, _recompute_worker, (tp, pp, sp, True))
    rtol = 0.0 if tp == 1 else 1e-6
    assert_dicts_close(merged(runs, "grads"), ref["grads"], rtol, what="recompute grads")
    if topology == "pp2":  # sensitivity: without the tape the recomputed layers go wrong
        bad = run_distributed(tp * pp, _recompute_worker, (tp, pp, sp, False))
        with pytest.raises(AssertionError):
            assert_dicts_close(merged(bad, "grads"), ref["grads"], 1e-3, what="no tape")


def _backend_worker(rank, world, tp, pp, sp, backend):
    # modality routing only: the router path is covered layer by layer in test_layers.py
    return {"modality": lora_step(tp, pp, sp, "modality", backend=backend, dtype=torch.float32)}


def test_triton_backend_gpt_tp2_sp():
    """The fused kernels (the CPU interpreter here) inside the real model at TP=2 + SP give the
    float32 single-process torch-backend step, up to float32 rounding."""
    ref = run_distributed(1, _backend_worker, (1, 1, False, "torch"))[0]
    runs = run_distributed(2, _backend_worker, (2, 1, True, "triton"))
    for variant in ref:
        got = [r[variant] for r in runs]
        assert got[0]["loss"] == pytest.approx(ref[variant]["loss"], rel=1e-6)
        worst = max(((got[0]["grads"][k] - v).abs().max() / v.abs().max()).item()
                    for k, v in ref[variant]["grads"].items())
        print(f"{variant}: worst relative gradient difference {worst:.2e}")
        assert_dicts_close(merged(got, "grads"), ref[variant]["grads"], 2e-5,
                           what=f"{variant} triton grads")
