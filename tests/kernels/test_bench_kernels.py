"""``python -m megalora.bench kernels`` where CI runs it: without a GPU it says so and runs its
correctness smoke (the fused kernels through the interpreter against the float64 reference, by
the 2x rule); the figures it prints agree with its verdicts, and a broken kernel fails it."""

import re
import subprocess
import sys

import pytest
import torch

LINE = re.compile(r"T=\s*(\d+) d=\s*(\d+) r=(\d+) K=(\d+) torch\.(\w+)\s+kernel err (\S+)\s+"
                  r"torch err (\S+)\s+(ok|FAIL)")
CASES = {(37, 40, 3, 1), (50, 96, 8, 3)}  # (T, d, r, K) of the smoke, each in fp32 and bf16

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the full benchmark is for humans")


def _rows(stdout):
    return [(int(T), int(d), int(r), int(K), dtype, float(err), float(pt), verdict)
            for T, d, r, K, dtype, err, pt, verdict in LINE.findall(stdout)]


def test_bench_kernels_cpu_smoke():
    out = subprocess.run([sys.executable, "-m", "megalora.bench", "kernels"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GPU timings need one" in out.stdout and "smoke passed" in out.stdout
    rows = _rows(out.stdout)
    assert sorted((T, d, r, K, dt) for T, d, r, K, dt, *_ in rows) == \
        sorted((*c, dt) for c in CASES for dt in ("float32", "bfloat16")), out.stdout
    for T, _, _, K, dtype, err, pt, verdict in rows:
        # the verdict is the 2x rule on the printed errors, and the rule is not vacuous: the
        # same-precision reference has a rounding error of its dtype's size (measured 12-110 eps)
        assert verdict == "ok" and err <= 2 * pt + 1e-6, (T, K, dtype, err, pt)
        eps = torch.finfo(getattr(torch, dtype)).eps
        assert eps <= pt <= 1e3 * eps, (T, K, dtype, pt)


def test_bench_kernels_smoke_fails_on_a_broken_kernel(monkeypatch, capsys):
    """A kernel that routes unrouted tokens (head id -1) to head 0 fails the multi-head lines
    and the smoke; the single-head lines (no head ids) still pass."""
    from megalora import ops
    from megalora.bench.kernels import run

    expand = ops.lora_expand

    def broken(s, b, scale, ids=None, *args, **kw):
        return expand(s, b, scale, None if ids is None else ids.clamp(min=0), *args, **kw)

    monkeypatch.setattr(ops, "lora_expand", broken)
    assert run() == 1
    stdout = capsys.readouterr().out
    rows = _rows(stdout)
    assert len(rows) == 4 and "smoke FAILED (2)" in stdout, stdout
    assert all((verdict == "FAIL") == (K > 1) for _, _, _, K, *_, verdict in rows), stdout
