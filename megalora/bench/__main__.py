"""python -m megalora.bench {kernels,reductions} [options]"""

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
    kernels.add_argument("--csv", default=None, help="CSV path (default out/bench/...)")
    red = sub.add_parser("reductions", help="per-objective gradient Gram/combine: megalora._C "
                         "vs the torch._foreach fallback")
    red.add_argument("--repeats", type=int, default=5, help="timed runs per line (median)")
    red.add_argument("--csv", default=None, help="CSV path (default out/bench/...)")
    args = parser.parse_args(argv)
    if args.which == "reductions":
        from megalora.bench.reductions import run

        return run(csv_path=args.csv, repeats=args.repeats)
    if args.which == "kernels":
        from megalora.bench.kernels import run

        return run(quick=args.quick, head_ids=args.head_ids, csv_path=args.csv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
