"""The ``megalora`` command: ``megalora train``, ``megalora layout``, ``megalora plan``,
``megalora export-peft``, ``megalora export-merged``, ``megalora pareto-plot``,
``megalora rank-search``.

    torchrun --nproc_per_node=2 -m megalora train --config launch/configs/umm_tiny.yaml
    megalora plan --config launch/configs/emu2_37b.yaml --gpus 16 --gpu-memory 80
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args) -> int:
    import torch.distributed as dist

    from megalora.distributed import launcher_rank
    from megalora.umm.config import RunConfig
    from megalora.umm.train import train

    run = RunConfig.from_yaml(args.config, args.overrides)
    # megalora's one-line notices (kernel path, TE, resume) from rank 0 only
    logging.basicConfig(level=logging.INFO if launcher_rank() == 0 else logging.WARNING,
                        format="%(message)s")
    try:
        train(run)
    finally:
        from megatron.core import parallel_state as ps

        if ps.is_initialized():
            ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalora", description="multimodal LoRA for Megatron")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="fine-tune the UMM with LoRA (run under torchrun/srun)")
    tr.add_argument("--config", required=True,
                    help="run config YAML, or a name under launch/configs (umm_tiny)")
    tr.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20")
    from megalora import launch
    from megalora.pareto import plot
    from megalora.umm import hf, planner

    launch.add_parser(sub)
    from megalora.mars import cli as mars_cli

    mars_cli.add_parser(sub)
    planner.add_parser(sub)
    hf.add_parsers(sub)
    plot.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "plan":
        return planner.run(args)
    if args.command == "pareto-plot":
        return plot.run(args)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
