"""python -m megalora.bench {kernels,reductions,train,gpu-check} [options]"""

import argparse
import sys


def main(argv=None):
    from megalora.logs import entry_point, take_verbose

    verbose, argv = take_verbose(argv)
    with entry_point(verbose):
        return _run(argv)


def _run(argv):
    parser = argparse.ArgumentParser(prog="python -m megalora.bench",
                                     description="megalora microbenchmarks",
                                     epilog="--verbose (anywhere): megalora's debug lines and "
                                            "every warning; MEGALORA_VERBOSE=1 the same")
    sub = parser.add_subparsers(dest="which", required=True)
    kernels = sub.add_parser("kernels", help="fused shared-A/multi-B LoRA kernels vs the "
                             "PyTorch reference and a PEFT-style per-head loop")
    kernels.add_argument("--quick", action="store_true", help="d=4096, r=16, K in {1,2} only")
    kernels.add_argument("--head-ids", choices=["contiguous", "interleaved"],
                         default="contiguous", help="the tokens' head (modality) ids: K "
                         "contiguous spans, or interleaved (token t -> head t mod K)")
    kernels.add_argument("--tune", action="store_true", help="first time the fused adapter "
                         "under each candidate tile (BLOCK_M x BLOCK_N), print the fastest and "
                         "use it (MEGALORA_TRITON_BLOCKS pins it later)")
    kernels.add_argument("--csv", default=None, help="CSV path (default out/bench/...)")
    red = sub.add_parser("reductions", help="per-objective gradient Gram/combine: megalora._C "
                         "vs the torch._foreach fallback")
    red.add_argument("--repeats", type=int, default=5, help="timed runs per line (median)")
    red.add_argument("--elements", type=int, default=40_000_000,
                     help="gradient elements per objective (default 40M)")
    red.add_argument("--gpu-only", action="store_true", help="leave out the CPU rows when a GPU "
                     "and the CUDA extension are there")
    red.add_argument("--csv", default=None, help="CSV path (default out/bench/...)")
    tr = sub.add_parser("train", help="tokens/s, MFU and peak memory of a short training run: "
                        "vanilla LoRA and Pareto LoRA exact / cheap")
    tr.add_argument("--config", default="launch/configs/umm_small.yaml")
    tr.add_argument("--steps", type=int, default=30, help="steps per variant")
    tr.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    tr.add_argument("--variants", nargs="+", default=None,
                    help="vanilla, pareto-exact, pareto-cheap (default: all)")
    tr.add_argument("--csv", default=None, help="CSV path (default out/bench/...)")
    tr.add_argument("overrides", nargs="*", help="section.field=value for every variant")
    gc = sub.add_parser("gpu-check", help="every GPU figure in one run (make gpu-check)")
    gc.add_argument("--out", required=True, help="folder for the summary, CSVs and logs")
    gc.add_argument("--dry-run", action="store_true", help="CPU: check the wiring, say which "
                    "steps need a GPU")
    args = parser.parse_args(argv)
    if args.which == "reductions":
        from megalora.bench.reductions import run

        return run(csv_path=args.csv, repeats=args.repeats, total=args.elements,
                   gpu_only=args.gpu_only)
    if args.which == "kernels":
        from megalora.bench.kernels import run

        return run(quick=args.quick, head_ids=args.head_ids, csv_path=args.csv, tune=args.tune)
    if args.which == "train":
        from megalora.bench.train import run

        return run(args.config, args.steps, args.warmup, args.variants, args.overrides,
                   args.csv)
    from megalora.bench.gpu_check import run

    return run(args.out, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
