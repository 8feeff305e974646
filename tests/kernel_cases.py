"""Shared inputs and the error rule for the Triton kernel tests.

The rule (flash-attention's): for every output and gradient,
    max|kernel - ref64| <= 2 * max|torch_same_precision - ref64| + atol
where ref64 is the reference in float64 on the same (rounded) inputs and torch_same_precision is
the reference run in the kernel's dtype. ``atol`` only absorbs exact-zero cases.
"""

from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: kernel tests skipped")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class KernelCase:
    tokens: int
    d_in: int
    d_out: int
    rank: int
    heads: int
    routing: str            # "single" | "ids" | "contiguous" | "router" | "router_top1"
    dropout: tuple = (0.0,)
    seed: int = 0

    @property
    def id(self):
        p = "-".join(f"{q:g}" for q in self.dropout)
        return (f"T{self.tokens}-{self.d_in}x{self.d_out}-r{self.rank}-K{self.heads}-"
                f"{self.routing}-p{p}")


CASES = [
    KernelCase(37, 40, 24, 3, 1, "single"),
    KernelCase(37, 40, 24, 3, 1, "single", (0.25,)),
    KernelCase(1, 17, 9, 5, 2, "ids"),
    KernelCase(50, 96, 40, 8, 3, "ids", (0.1, 0.3, 0.0)),
    KernelCase(48, 32, 33, 16, 2, "contiguous", (0.2,)),
    KernelCase(29, 24, 20, 4, 3, "router"),
    KernelCase(29, 24, 20, 4, 3, "router_top1", (0.15,)),
    KernelCase(20, 16, 16, 40, 4, "ids"),  # K x padded rank > 128: heads split across programs
]


def make_inputs(case: KernelCase, dtype, device=DEVICE):
    """float64 masters, already rounded to ``dtype`` so every path sees the same numbers."""
    g = torch.Generator().manual_seed(case.seed)

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return t.to(dtype).to(torch.float64).to(device)

    T, K = case.tokens, case.heads
    ids = torch.randint(-1, K, (T,), generator=g)
    if case.routing == "contiguous":
        ids = torch.zeros(T, dtype=torch.long)
        ids[T // 3:] = 1
        ids[:3] = -1
    return {
        "x": rnd(T, case.d_in), "a": rnd(case.rank, case.d_in, scale=0.3),
        "b": rnd(K, case.d_out, case.rank, scale=0.3), "dy": rnd(T, case.d_out),
        "logits": rnd(T, K), "ids": ids.to(device), "scale": 0.75,
    }


def check_rule(kernel: torch.Tensor, torch_pt: torch.Tensor, ref: torch.Tensor, name: str,
               atol: float = 1e-6):
    k_err = (kernel.double() - ref).abs().max().item() if ref.numel() else 0.0
    pt_err = (torch_pt.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2 * pt_err + atol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert k_err <= bound, \
        f"{name}: kernel error {k_err:.3e} > 2 x torch error {pt_err:.3e} (+atol)"
