"""``python -m megalora.bench kernels``: the fused shared-A / multi-B LoRA ops on a GPU.

Providers, all computing y = y_base + scale * sum_k w_k (x A^T) B_k^T and its gradients:
- ``fused``:  ``lora_shrink`` + ``lora_expand`` on the Triton backend, the expand adding into the
  base output in place (what the parallel layers run on CUDA);
- ``torch``:  the same ops on the plain-PyTorch reference backend;
- ``peft``:   a PEFT/HydraLoRA-style loop that recomputes x A^T for every head and masks;
- ``compiled``: ``torch.compile`` of the reference written with masks (no data-dependent
  shapes), the fastest thing a user gets without our kernels.

The layer rows (``--layer``) put the adapter where it runs, after the frozen base GEMM
(y = x W^T, W [d, d]): ``base`` alone, ``base+fused`` and ``base+peft``; the overhead is the
adapter's share of the base layer's time.

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

    def masked(x, a, b, ids, y_base):
        s = x @ a.t()
        y = y_base
        for k in range(b.shape[0]):
            part = s if ids is None else s * (ids == k).unsqueeze(1).to(s.dtype)
            y = y + (part @ b[k].t()) * scale
        return y

    compiled_fn = torch.compile(masked, fullgraph=True, dynamic=False)
    _allow_recompiles(torch)
    return {"fused": fused, "torch": reference, "peft": peft,
            "compiled": lambda: compiled_fn(x, a, b, ids, y_base)}


def _allow_recompiles(torch, limit=64):
    """Every benchmark shape and mode compiles anew; dynamo's default limit (8) would fall back
    to eager after eight."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.7
        if hasattr(config, name):
            setattr(config, name, max(limit, getattr(config, name)))
            return


def _layer_providers(x, w, a, b, ids, scale):
    """The frozen base GEMM y = x W^T alone, then with the fused adapter added into y in place
    (what the parallel layers run on CUDA), then with the PEFT-style loop added."""
    from megalora import ops

    def base():
        return x @ w.t()

    def base_fused():
        s = ops.lora_shrink(x, a, None, ids, backend="triton")
        return ops.lora_expand(s, b, scale, ids, backend="triton", out=x @ w.t())

    def base_peft():
        y = x @ w.t()
        for k in range(b.shape[0]):
            part = ((x @ a.t()) @ b[k].t()) * scale
            if ids is not None:
                part = part * (ids == k).unsqueeze(1).to(part.dtype)
            y = y + part
        return y

    return {"base": base, "base+fused": base_fused, "base+peft": base_peft}


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


def _inputs(T, d, r, K, order):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=g).bfloat16().requires_grad_()
    a = (torch.randn(r, d, device="cuda", generator=g) * d ** -0.5).bfloat16().requires_grad_()
    b = (torch.randn(K, d, r, device="cuda", generator=g) * r ** -0.5).bfloat16().requires_grad_()
    w = (torch.randn(d, d, device="cuda", generator=g) * d ** -0.5).bfloat16()  # frozen base
    y_base = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    dy = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    return x, a, b, w, y_base, dy, _head_ids(T, K, order, "cuda")


def _gpu_rows(shapes, order, stamp, roof) -> List[dict]:
    rows = []
    T = shapes["T"]
    for d in shapes["d"]:
        for r in shapes["r"]:
            for K in shapes["K"]:
                x, a, b, w, y_base, dy, ids = _inputs(T, d, r, K, order)
                benches = (("adapter", _providers(x, a, b, ids, y_base, 2.0), "peft"),
                           ("layer", _layer_providers(x, w, a, b, ids, 2.0), "base"))
                for bench, fns, ref in benches:
                    for mode in ("fwd", "fwd+bwd"):
                        times = {p: _time(f, mode, [x, a, b], dy) for p, f in fns.items()}
                        for provider, (med, p20, p80) in times.items():
                            gbs = _bytes(T, d, mode) / (med * 1e-3) / 1e9
                            row = {**stamp, "bench": bench, "T": T, "d": d, "r": r, "K": K,
                                   "head_ids": order, "mode": mode, "provider": provider,
                                   "ms": round(med, 4), "ms_p20": round(p20, 4),
                                   "ms_p80": round(p80, 4)}
                            if bench == "adapter":  # speed against the PEFT-style loop
                                row.update({"GB/s": round(gbs, 1),
                                            "pct_hbm": round(100 * gbs / roof, 1),
                                            "vs_ref": round(times[ref][0] / med, 2)})
                            else:  # the adapter's time as a share of the base layer's
                                row.update({"GB/s": "", "pct_hbm": "",
                                            "vs_ref": round(100 * (med / times[ref][0] - 1), 1)})
                            rows.append(row)
    return rows


TILE_CANDIDATES = ((32, 64), (64, 64), (64, 128), (128, 64), (128, 128))


def tune_blocks(candidates=TILE_CANDIDATES, T=8192, d=4096, r=16, K=2) -> List[dict]:
    """Time the fused adapter (fwd+bwd, bf16, contiguous heads) under each pinned
    (BLOCK_M, BLOCK_N) and return one row per candidate, fastest first."""
    from megalora.triton_kernels.common import BLOCKS_ENV

    x, a, b, _, y_base, dy, ids = _inputs(T, d, r, K, "contiguous")
    before = os.environ.get(BLOCKS_ENV)
    rows = []
    try:
        for bm, bn in candidates:
            os.environ[BLOCKS_ENV] = f"{bm}x{bn}"
            fused = _providers(x, a, b, ids, y_base, 2.0)["fused"]
            row = {"T": T, "d": d, "r": r, "K": K, "BLOCK_M": bm, "BLOCK_N": bn}
            try:
                med, p20, p80 = _time(fused, "fwd+bwd", [x, a, b], dy)
                row.update(ms=round(med, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4))
            except Exception as exc:  # e.g. a tile whose shared memory does not fit: say so
                row.update(ms=float("inf"), ms_p20="", ms_p80="",
                           error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
    finally:
        if before is None:
            os.environ.pop(BLOCKS_ENV, None)
        else:
            os.environ[BLOCKS_ENV] = before
    return sorted(rows, key=lambda row: row["ms"])


def _tune_and_pin(csv_path: Optional[str]) -> None:
    """tune_blocks, its table and CSV (beside the kernel CSV); the fastest tile is pinned in
    this process's MEGALORA_TRITON_BLOCKS for the timings that follow."""
    from megalora.bench import stamp, write_csv
    from megalora.triton_kernels.common import BLOCKS_ENV

    rows = tune_blocks()
    print("tile search (fused adapter fwd+bwd, d=4096, r=16, K=2, bf16):")
    for row in rows:
        print(f"  BLOCK_M={row['BLOCK_M']:>3} BLOCK_N={row['BLOCK_N']:>3}  "
              + (f"{row['ms']:.4f} ms" if "error" not in row else f"failed: {row['error']}"))
    best = rows[0]
    if "error" in best:
        print("tile search: every candidate failed; the defaults stay")
        return
    os.environ[BLOCKS_ENV] = f"{best['BLOCK_M']}x{best['BLOCK_N']}"
    print(f"chosen: {BLOCKS_ENV}={os.environ[BLOCKS_ENV]} (pin it with this variable)")
    if csv_path:
        info = stamp()
        write_csv([{**info, "error": "", **row} for row in rows],
                  os.path.join(os.path.dirname(os.path.abspath(csv_path)), "tiles.csv"))


def _print_table(rows):
    head = f"{'bench':<7} {'d':>5} {'r':>4} {'K':>2} {'mode':<8} {'provider':<10} {'ms':>8} " \
           f"{'GB/s':>7} {'%HBM':>5} {'vs ref':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        versus = (f"{row['vs_ref']:>7.2f}x" if row["bench"] == "adapter"
                  else f"{row['vs_ref']:>+7.1f}%")
        print(f"{row['bench']:<7} {row['d']:>5} {row['r']:>4} {row['K']:>2} {row['mode']:<8} "
              f"{row['provider']:<10} {row['ms']:>8.3f} {str(row['GB/s']):>7} "
              f"{str(row['pct_hbm']):>5} {versus}")
    print("vs ref: adapter rows, speed-up over the PEFT-style loop; layer rows, time added to "
          "the base GEMM")


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
    return failures + _providers_smoke()


def _providers_smoke() -> int:
    """Every timed provider, the layer rows' too, computes the same y (fp32, CPU, tiny shapes)
    as the float64 reference: a baseline that computed something else would time nothing."""
    import torch

    from megalora.reference import lora_expand_ref, lora_shrink_ref

    g = torch.Generator().manual_seed(1)
    T, d, r, K = 50, 96, 8, 3
    x, a = torch.randn(T, d, generator=g), torch.randn(r, d, generator=g) * d ** -0.5
    b, w = torch.randn(K, d, r, generator=g), torch.randn(d, d, generator=g) * d ** -0.5
    y_base, ids = torch.randn(T, d, generator=g), _head_ids(T, K, "interleaved", "cpu")
    adapter = lora_expand_ref(lora_shrink_ref(x.double(), a.double()), b.double(), 0.5, ids)
    want = {"adapter": y_base.double() + adapter, "layer": x.double() @ w.double().t() + adapter}
    failures = 0
    for bench, fns in (("adapter", _providers(x, a, b, ids, y_base, 0.5)),
                       ("layer", _layer_providers(x, w, a, b, ids, 0.5))):
        for name, fn in fns.items():
            ref = want[bench] - (adapter if name == "base" else 0)
            err = ((fn().double() - ref).norm() / ref.norm()).item()
            ok = err < 1e-5
            failures += not ok
            print(f"  {bench:<7} {name:<10} fp32 relative error {err:.1e}  "
                  f"{'ok' if ok else 'FAIL'}")
    return failures


def run(quick: bool = False, head_ids: str = "contiguous",
        csv_path: Optional[str] = None, tune: bool = False) -> int:
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

    from megalora.bench import copy_bandwidth_gbs

    info = stamp()
    roof = copy_bandwidth_gbs()
    print(f"{info['gpu']}: measured copy bandwidth {roof:.0f} GB/s (the 100% line)")
    if tune:
        _tune_and_pin(csv_path)
    rows = _gpu_rows(SHAPES_QUICK if quick else SHAPES_FULL, head_ids, info, roof)
    _print_table(rows)
    path = write_csv(rows, csv_path or default_csv("kernels", info["gpu"]))
    print(f"wrote {path}")
    return 0
