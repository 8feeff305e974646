"""The benchmark command works where CI runs it: without a GPU it says so and runs a smoke."""

import subprocess
import sys

import pytest


def test_bench_kernels_cpu_smoke():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full benchmark is for humans, not CI")
    out = subprocess.run([sys.executable, "-m", "megalora.bench", "kernels"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GPU timings need one" in out.stdout and "smoke passed" in out.stdout
