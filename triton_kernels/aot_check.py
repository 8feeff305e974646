"""Compile every kernel variant for real GPUs without one:
``python -m megalora.triton_kernels.aot_check``.

Triton ships ptxas, so kernels can be lowered to cubin for sm_80 / sm_90 on a CPU machine. CI
runs this so that an error only the GPU compiler sees (a layout it cannot lower, a dot shape,
a type mix the interpreter tolerates) fails the build. It compiles the constexpr combinations
the launchers use for the benchmark shapes and prints shared memory per kernel. It must run
without TRITON_INTERPRET (the interpreter replaces ``triton.jit``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings

_PTR_TYPES = {"ids_ptr": "*i32", "w_ptr": "*fp32", "p_ptr": "*fp32", "out_ptr": "*fp32",
              "ds_ptr": "*fp32", "db_ptr": "*fp32", "dw_ptr": "*fp32"}
_SCALARS = {"scale": "fp32", "seed": "i64", "tok_off": "i32", "feat_off": "i32"}


def _compile(fn, dtype: str, consts: dict, target, overrides=None):
    import triton
    from triton.compiler import ASTSource

    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in (overrides or {}):
            sig[name] = overrides[name]
        elif name.endswith("_ptr"):
            sig[name] = _PTR_TYPES.get(name, f"*{dtype}")
        else:
            sig[name] = _SCALARS.get(name, "i32")
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=target)


def variants():
    """(kernel name, fn, dtype, constexprs, pointer overrides) as the GPU launchers choose them."""
    from megalora.triton_kernels import lora_expand as E
    from megalora.triton_kernels import lora_shrink as S
    from megalora.triton_kernels.common import block_sizes, pow2

    out = []
    # bf16 (the training dtype) over small/large rank and one/many heads; fp16 and fp32 (IEEE
    # dots, slow to compile) at one shape each
    combos = [("bf16", False, r, k) for r, k in itertools.product((16, 128), (1, 4))]
    combos += [("fp16", False, 16, 2), ("fp32", True, 16, 2)]
    for dt, ieee, r, k in combos:
        br = pow2(r)
        hpp, chunks = E._heads_per_prog(k, br)
        bm, bn = block_sizes(8192, 4096, hpp * br)
        flags = dict(BLOCK_R=br, UPCAST=False, IEEE=ieee)
        routings = (0,) if k == 1 else (1, 2)
        for routing in routings:
            wide = dict(BLOCK_M=bm, BLOCK_N=bn, HEADS_PER_PROG=hpp, ROUTING=routing, **flags)
            out.append(("expand_fwd", E._lora_expand_fwd_kernel, dt,
                        dict(wide, ACCUMULATE=True, CHUNKS=chunks), None))
            out.append(("expand_bwd_fused", E._lora_expand_bwd_fused_kernel, dt,
                        dict(wide, CHUNKS=chunks), None))
            out.append(("expand_bwd_ds", E._lora_expand_bwd_ds_kernel, dt,
                        dict(wide, CHUNKS=chunks), None))
            out.append(("expand_bwd_db", E._lora_expand_bwd_db_kernel, dt, wide, None))
        heads = k + 1 if k > 1 else 1
        shpp = max(1, min(1 << (heads - 1).bit_length(), S._MAX_WIDE // br))
        sbm, sbd = block_sizes(8192, 4096)
        for dropout, per_head in ((False, False), (True, True)):
            drop = dict(DROPOUT=dropout, PER_HEAD_P=per_head, BLOCK_M=sbm, BLOCK_D=sbd, **flags)
            out.append(("shrink_fwd", S._lora_shrink_fwd_kernel, dt, drop, None))
            same = {"ds_ptr": f"*{dt}"}  # here ds is the operand dtype (it is fp32 elsewhere)
            out.append(("shrink_dx", S._lora_shrink_dx_kernel, dt, drop, same))
            dbm, dbd = block_sizes(8192, 4096, shpp * br)
            out.append(("shrink_da", S._lora_shrink_da_kernel, dt,
                        dict(drop, BLOCK_M=dbm, BLOCK_D=dbd, SPLIT=k > 1, HEADS_PER_PROG=shpp),
                        same))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities to compile for (default: 90, H100/H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter cannot compile)")
        return 2
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from triton.backends.compiler import GPUTarget

    failures, shared = 0, {}
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, dtype, consts, overrides in variants():
            try:
                kernel = _compile(fn, dtype, consts, target, overrides)
                key = (arch, name)
                shared[key] = max(shared.get(key, 0), kernel.metadata.shared)
            except Exception as exc:  # report every failing variant, then fail
                failures += 1
                print(f"FAIL sm_{arch} {name} {dtype} {consts}: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}")
    count = len(variants()) * len(args.arch)
    for (arch, name), nbytes in sorted(shared.items()):
        print(f"sm_{arch} {name:<18} max shared memory {nbytes / 1024:6.1f} KiB")
    print(f"aot_check: {count - failures}/{count} kernel variants compiled to cubin")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
