"""``python -m megalora.bench kernels``: the fused shared-A / multi-B LoRA ops on a GPU.

Providers, all computing y = y_base + scale * sum_k w_k (x A^T) B_k^T and its gradients:
- ``fused``:  ``lora_shrink`` + ``lora_expand`` on the Triton backend, the expand adding into the
  base output in place (what the parallel layers run on CUDA);
- ``torch``:  the same ops on the plain-PyTorch reference backend;
- ``peft``:   a PEFT/HydraLoRA-style loop that recomputes x A^T for every head and masks.

Bytes model (bf16, the traffic the fused path cannot avoid without owning the base GEMMs):
forward reads x and read-modify-writes y (2 |x| + 2 |y|); backward reads dy, reads x again and
writes dx (|dy| + |x| + |dx|). Achieved GB/s = bytes / median time; % HBM is relative to the
measured device copy bandwidth. Without a GPU it runs a tiny correctness smoke on the CPU
(TRITON_INTERPRET=1) and says so.
"""

from __future__ import annotations

import os
from typing import List, Optional

SHAPES_FULL = dict(T=8192, d=(4096, 8192), r=(16, 64, 128), K=(1, 2, 4))
SHAPES_QUICK = dict(T=8192, d=(4096,), r=(16,), K=(1, 2))


def _head_ids(T: int, K: int, order: str, device):
    """Per-token head ids: K contiguous spans, or interleaved (token t -> head t mod K)."""
    import torch

    if K == 1:
        return None
    if order == "interleaved":
        return torch.arange(T, device=device) % K
    return (torch.arange(T, device=device) * K // T).to(torch.long)  # K contiguous spans


def _providers(x, a, b, ids, y_base, scale):
    import torch

    from megalora import ops

    def fused():
        s = ops.lora_shrink(x, a, None, ids, backend="triton")
        return ops.lora_expand(s, b, scale, ids, backend="triton", out=y_base.clone())

    def reference():
        s = ops.lora_shrink(x, a, None, ids, backend="torch")
        return y_base + ops.lora_expand(s, b, scale, ids, backend="torch")

    def peft():
        y = y_base
        for k in range(b.shape[0]):
            z = x @ a.t()  # recomputed per head, as per-head LoRA modules do
            part = (z @ b[k].t()) * scale
            if ids is not None:
                part = part * (ids == k).unsqueeze(1).to(part.dtype)
            y = y + part
        return y

    del torch
    return {"fused": fused, "torch": reference, "peft": peft}


def _time(fn, mode, grads, dy):
    import torch
    import triton

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        torch.autograd.backward(fn(), dy)

    q = triton.testing.do_bench(fwd if mode == "fwd" else fwd_bwd, warmup=10, rep=100,
                                quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
    return q


def _bytes(T, d, mode, elt=2):
    fwd = 2 * T * d * elt + 2 * T * d * elt
    return fwd if mode == "fwd" else fwd + 3 * T * d * elt


def _gpu_rows(shapes, order, stamp) -> List[dict]:
    import torch

    from megalora.bench import copy_bandwidth_gbs

    roof = copy_bandwidth_gbs()
    print(f"{stamp['gpu']}: measured copy bandwidth {roof:.0f} GB/s (the 100% line)")
    rows = []
    T = shapes["T"]
    for d in shapes["d"]:
        for r in shapes["r"]:
            for K in shapes["K"]:
                g = torch.Generator(device="cuda").manual_seed(0)
                x = torch.randn(T, d, device="cuda", generator=g).bfloat16().requires_grad_()
                a = (torch.randn(r, d, device="cuda", generator=g) * d ** -0.5).bfloat16()
                b = (torch.randn(K, d, r, device="cuda", generator=g) * r ** -0.5).bfloat16()
                a.requires_grad_(), b.requires_grad_()
                y_base = torch.randn(T, d, device="cuda", generator=g).bfloat16()
                dy = torch.randn(T, d, device="cuda", generator=g).bfloat16()
                ids = _head_ids(T, K, order, "cuda")
                fns = _providers(x, a, b, ids, y_base, 2.0)
                for mode in ("fwd", "fwd+bwd"):
                    times = {p: _time(f, mode, [x, a, b], dy) for p, f in fns.items()}
                    for provider, (med, p20, p80) in times.items():
                        gbs = _bytes(T, d, mode) / (med * 1e-3) / 1e9
                        rows.append({**stamp, "T": T, "d": d, "r": r, "K": K, "head_ids": order,
                                     "mode": mode, "provider": provider, "ms": round(med, 4),
                                     "ms_p20": round(p20, 4), "ms_p80": round(p80, 4),
                                     "GB/s": round(gbs, 1), "pct_hbm": round(100 * gbs / roof, 1),
                                     "speedup_vs_peft": round(times["peft"][0] / med, 2)})
    return rows


def _print_table(rows):
    head = f"{'d':>5} {'r':>4} {'K':>2} {'mode':<8} {'provider':<7} {'ms':>8} {'GB/s':>7} " \
           f"{'%HBM':>5} {'vs peft':>7}"
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['d']:>5} {row['r']:>4} {row['K']:>2} {row['mode']:<8} {row['provider']:<7} "
              f"{row['ms']:>8.3f} {row['GB/s']:>7.0f} {row['pct_hbm']:>5.0f} "
              f"{row['speedup_vs_peft']:>6.2f}x")


def _cpu_smoke() -> int:
    """Small shapes through the interpreter: the fused ops against the float64 reference."""
    import torch

    from megalora import ops
    from megalora.reference import DropoutSpec, lora_expand_ref, lora_shrink_ref

    failures = 0
    g = torch.Generator().manual_seed(0)
    for T, d, r, K in ((37, 40, 3, 1), (50, 96, 8, 3)):
        x, a = torch.randn(T, d, generator=g), torch.randn(r, d, generator=g)
        b = torch.randn(K, 24, r, generator=g)
        ids = torch.randint(-1, K, (T,), generator=g) if K > 1 else None
        spec = DropoutSpec((0.1,), seed=3)
        for dtype in (torch.float32, torch.bfloat16):
            x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)  # every path sees the same inputs
            want = lora_expand_ref(lora_shrink_ref(x.double(), a.double(), spec), b.double(),
                                   0.5, ids)
            got = ops.lora_expand(ops.lora_shrink(x.to(dtype), a.to(dtype), spec, ids,
                                                  backend="triton"), b.to(dtype), 0.5, ids,
                                  backend="triton")
            pt = lora_expand_ref(lora_shrink_ref(x.to(dtype), a.to(dtype), spec), b.to(dtype),
                                 0.5, ids)
            err = (got.double() - want).abs().max().item()
            pt_err = (pt.double() - want).abs().max().item()
            ok = err <= 2 * pt_err + 1e-6
            failures += not ok
            print(f"  T={T:3d} d={d:3d} r={r} K={K} {str(dtype):15s} kernel err {err:.2e}  "
                  f"torch err {pt_err:.2e}  {'ok' if ok else 'FAIL'}")
    return failures


def run(quick: bool = False, head_ids: str = "contiguous",
        csv_path: Optional[str] = None) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("megalora.bench kernels: no CUDA GPU here, and GPU timings need one. Running a tiny "
              "correctness smoke of the fused kernels on the CPU (TRITON_INTERPRET=1) instead:")
        failures = _cpu_smoke()
        print("smoke " + ("passed" if not failures else f"FAILED ({failures})") +
              "; run on a GPU machine for the timing table and CSV.")
        return 1 if failures else 0
    from megalora.bench import default_csv, stamp, write_csv

    info = stamp()
    rows = _gpu_rows(SHAPES_QUICK if quick else SHAPES_FULL, head_ids, info)
    _print_table(rows)
    path = write_csv(rows, csv_path or default_csv("kernels", info["gpu"]))
    print(f"wrote {path}")
    return 0
