"""``python -m megalora.bench reductions``: the gradient reductions, extension vs fallback.

2000 tensors of random sizes totalling ~40M elements per objective (all-linear LoRA of a
mid-size model), K = 2 and 4 objectives, 20 parameter groups; ``gram`` (the K x K products) and
``combine`` (a weighted sum written into fp32 buffers). Times are medians of repeated runs;
GB/s counts the K x P gradient bytes each call must read (combine also writes P fp32). On CPU
the reference line is the measured copy bandwidth of a large tensor; on a GPU it is the device
copy bandwidth. Writes a CSV stamped with the machine and versions.

Backends: ``ext`` (megalora._C), ``torch`` (the ``torch._foreach`` fallback) and ``flat``: the
gradients already in one contiguous [K, P] buffer (as Megatron's DDP keeps them) and one
matmul over it, with one weight per objective and the Gram of the whole buffer (no per-group
split). ``flat`` is the fastest thing a user could write instead, and a lower bound: it does
less than the grouped ops, and its buffer is built outside the timing.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import List, Optional

P_TENSORS = 2000
TOTAL_ELEMENTS = 40_000_000
GROUPS = 20


def _sizes(seed: int = 0, total: int = TOTAL_ELEMENTS) -> List[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(P_TENSORS, generator=g))  # log-normal spread of tensor sizes
    sizes = (w / w.sum() * total).round().long().clamp_min(1)
    return sizes.tolist()


def _median_ms(fn, device, repeats: int) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _copy_gbs(device: str) -> float:
    import torch

    src = torch.empty(64 << 20, dtype=torch.float32, device=device)  # 256 MB
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _flat(grads, weights):
    """(gram, combine) on one contiguous [K, P] buffer: one matmul each."""
    import torch

    buf = torch.stack([torch.cat(per_objective) for per_objective in grads])
    w = weights[0].to(device=buf.device, dtype=buf.dtype)
    out = torch.zeros(buf.shape[1], device=buf.device)
    return {"gram": lambda: buf @ buf.t(), "combine": lambda: out.copy_(w @ buf)}


def _rows(device: str, stamp: dict, repeats: int, total: int) -> List[dict]:
    import torch

    from megalora import reductions

    sizes = _sizes(total=total)
    groups = [p * GROUPS // P_TENSORS for p in range(P_TENSORS)]
    roof = _copy_gbs(device)
    print(f"{stamp['gpu'] if device == 'cuda' else 'CPU'}: copy bandwidth {roof:.1f} GB/s; "
          f"{P_TENSORS} tensors, {sum(sizes) / 1e6:.1f}M elements per objective, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for K in (2, 4):
            g = torch.Generator(device=device).manual_seed(K)
            grads = [[torch.randn(n, generator=g, device=device).to(dtype) for n in sizes]
                     for _ in range(K)]
            weights = torch.rand(GROUPS, K)
            out = [torch.zeros(n, device=device) for n in sizes]
            read = K * sum(sizes) * grads[0][0].element_size()
            flat = _flat(grads, weights)
            for op in ("gram", "combine"):
                nbytes = read + (4 * sum(sizes) if op == "combine" else 0)
                times = {}
                for backend in ("ext", "torch"):
                    # partial binds this iteration's tensors now (a lambda looks them up
                    # when it is called)
                    if op == "gram":
                        fn = functools.partial(reductions.gram, grads, groups, GROUPS,
                                               backend=backend)
                    else:
                        fn = functools.partial(reductions.combine, grads, weights, groups, out,
                                               backend=backend)
                    times[backend] = _median_ms(fn, device, repeats)
                times["flat"] = _median_ms(flat[op], device, repeats)
                for backend, ms in times.items():
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    rows.append({**stamp, "device": device, "op": op, "K": K,
                                 "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                                 "tensors": P_TENSORS, "elements": sum(sizes),
                                 "ms": round(ms, 2), "GB/s": round(gbs, 1),
                                 "pct_copy_bw": round(100 * gbs / roof, 1),
                                 "speedup_vs_torch": round(times["torch"] / ms, 2)})
    return rows


def run(csv_path: Optional[str] = None, repeats: int = 5, total: int = TOTAL_ELEMENTS,
        gpu_only: bool = False) -> int:
    import torch

    from megalora import extension
    from megalora.bench import default_csv, stamp, write_csv

    if extension.load() is None:
        print(f"megalora._C is not built ({extension.unavailable_reason()}): nothing to compare; "
              "build it with `pip install --no-build-isolation -e .`")
        return 1
    info = stamp()
    cuda = torch.cuda.is_available() and extension.load().has_cuda()
    devices = (["cpu"] if not (gpu_only and cuda) else []) + (["cuda"] if cuda else [])
    if torch.cuda.is_available() and "cuda" not in devices:
        print("a GPU is present but megalora._C was built without CUDA: GPU rows skipped")
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: CPU rows only (GPU figures need a GPU machine)")
    rows = []
    for device in devices:
        rows += _rows(device, info, repeats, total)
    print(f"{'device':<6} {'op':<8} {'dtype':<9} {'K':>2} {'backend':<6} {'ms':>9} {'GB/s':>7} "
          f"{'%copy':>6} {'vs torch':>8}")
    for r in rows:
        print(f"{r['device']:<6} {r['op']:<8} {r['dtype']:<9} {r['K']:>2} {r['backend']:<6} "
              f"{r['ms']:>9.2f} {r['GB/s']:>7.1f} {r['pct_copy_bw']:>6.1f} "
              f"{r['speedup_vs_torch']:>7.2f}x")
    path = write_csv(rows, csv_path or default_csv("reductions", info["gpu"]))
    print(f"wrote {path}")
    return 0
