"""The ``megalora`` command: ``megalora train``, ``megalora layout``, ``megalora plan``,
``megalora export-peft``, ``megalora export-merged``, ``megalora pareto-plot``,
``megalora rank-search``, ``megalora emojicap``.

    torchrun --nproc_per_node=2 -m megalora train --config launch/configs/umm_tiny.yaml
    megalora plan --config launch/configs/emu2_37b.yaml --gpus 16 --gpu-memory 80
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    # Logging levels and warning filters are set once, by main() (megalora.logs).
    from megalora.errors import agree
    from megalora.umm.config import RunConfig
    from megalora.umm.train import train

    with agree("config"):  # the same file on every rank: the same error, printed once
        run = RunConfig.from_yaml(args.config, args.overrides)
    train(run)  # it sets up and tears down the process group (megalora.umm.session)
    return 0


def main(argv=None) -> int:
    """The command line; user errors print one line (``megalora.errors``) and exit 2.
    Upstream noise is hidden unless ``--verbose`` (``megalora.logs``)."""
    from megalora.distributed import launcher_rank
    from megalora.errors import report
    from megalora.logs import entry_point, take_verbose

    verbose, argv = take_verbose(argv)
    # Entered before _dispatch imports megatron, whose warnings fire once, at import.
    with entry_point(verbose, launcher_rank()):
        try:
            return _dispatch(argv)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - reported below, exit code from report()
            from megalora.errors import AgreedError

            same = isinstance(exc, AgreedError)
            return report(exc, launcher_rank(), verbose, same_on_all_ranks=same)


def _dispatch(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="megalora", description="multimodal LoRA for Megatron",
        epilog="--verbose (anywhere): full tracebacks for errors, upstream warnings and logs, "
               "megalora's debug lines; MEGALORA_VERBOSE=1 the same")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="fine-tune the UMM with LoRA (run under torchrun/srun)")
    tr.add_argument("--config", required=True,
                    help="run config YAML, or a name under launch/configs (umm_tiny)")
    tr.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20")
    from megalora import launch
    from megalora.mars import cli as mars_cli
    from megalora.pareto import plot
    from megalora.umm import emojicap, emojicap_eval, eva_features, hf_cli, plan_cli, pretrain

    launch.add_parser(sub)
    mars_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    hf_cli.add_parsers(sub)
    plot.add_parser(sub)
    emojicap.add_parser(sub)
    emojicap_eval.add_parser(sub)
    eva_features.add_parser(sub)
    emojicap_eval.add_eval_parser(sub)
    pretrain.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "plan":
        return plan_cli.run(args)
    if args.command == "pareto-plot":
        return plot.run(args)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
