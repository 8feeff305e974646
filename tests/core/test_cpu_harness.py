"""The CPU harness changes nothing at import and restores every redirection on exit."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # runs a script in a fresh interpreter

SCRIPT = textwrap.dedent("""
    import torch
    import megalora, megalora.cpu as cpu, megalora.testing.tiny_gpt  # imports patch nothing
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.pipeline_parallel.p2p_communication as p2p
    import megatron.core.tensor_parallel.random as rnd
    import megatron.core.utils as mu

    originals = [(o, n, getattr(o, n)) for o, n, _ in cpu._patches()]
    assert schedules.torch is torch and p2p.torch is torch
    with cpu.cpu_megatron():
        assert schedules.torch is not torch
        assert p2p.torch.cuda.current_device() == torch.device("cpu")
        buf = mu.GlobalMemoryBuffer().get_tensor([2, 3], torch.float32, "x")
        assert buf.device.type == "cpu" and buf.shape == (2, 3)
        with rnd.CudaRNGStatesTracker().fork("anything"):
            pass
        with cpu.cpu_megatron():  # re-entrant
            pass
        assert schedules.torch is not torch  # still inside the outer block
    for owner, name, value in originals:
        assert getattr(owner, name) is value, (owner, name)
    print("OK")
""")


def test_harness_is_opt_in_and_restores():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
