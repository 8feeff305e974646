"""``megalora layout``: the resolved parallel layout of a launch, without starting training.

The launch scripts' ``--dry-run`` calls it with their node and process counts:

    megalora layout --config umm_tiny --nodes 4 --procs-per-node 8 parallel.tensor_parallel=2

It loads and validates the run config (overrides included), checks that TP x PP divides the
world, and prints world size, TP/SP/PP/DP, batch sizes and backend. A layout that cannot run
exits 2 with the reason.
"""

from __future__ import annotations

import sys

from megalora.distributed import LaunchError, check_layout


def layout_lines(run, nodes: int, procs_per_node: int, launcher: str = "") -> list:
    """The printed table; raises LaunchError/ValueError for a layout that cannot run."""
    world = nodes * procs_per_node
    p, t = run.parallel, run.train
    dp = check_layout(world, p.tensor_parallel, p.pipeline_parallel)
    if p.tensor_parallel > procs_per_node:
        raise LaunchError(f"parallel.tensor_parallel={p.tensor_parallel} spans nodes "
                          f"({procs_per_node} processes per node): keep TP within a node")
    global_batch = t.micro_batch_size * t.num_microbatches * dp
    device = {"cpu": "cpu / gloo", "cuda": "cuda / nccl"}.get(
        t.device, "auto: cuda / nccl if a GPU is visible, else cpu / gloo")
    return [
        f"launcher          {launcher or '-'}",
        f"nodes             {nodes} x {procs_per_node} processes = world size {world}",
        f"tensor parallel   {p.tensor_parallel}" + (" + sequence parallel"
                                                     if p.sequence_parallel else ""),
        f"pipeline parallel {p.pipeline_parallel}",
        f"data parallel     {dp}",
        f"batch             {t.micro_batch_size} per microbatch x {t.num_microbatches} "
        f"microbatches x DP {dp} = {global_batch} sequences of {run.data.seq_length} tokens",
        f"steps             {t.steps} (checkpoint every {t.save_every or 'end only'}, "
        f"resume {'on' if t.resume else 'off'})",
        f"device / backend  {device}",
        f"out_dir           {t.out_dir}",
    ]


def add_parser(sub) -> None:
    p = sub.add_parser("layout", help="print a launch's resolved layout (the scripts' --dry-run)")
    p.add_argument("--config", required=True, help="config path or name under launch/configs")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--procs-per-node", type=int, required=True)
    p.add_argument("--launcher", default="", help="shown in the table")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.set_defaults(handler=run)


def run(args) -> int:
    from megalora.umm.config import RunConfig

    try:
        if args.nodes < 1 or args.procs_per_node < 1:
            raise LaunchError(f"--nodes {args.nodes} and --procs-per-node "
                              f"{args.procs_per_node} must be positive")
        cfg = RunConfig.from_yaml(args.config, args.overrides)
        lines = layout_lines(cfg, args.nodes, args.procs_per_node, args.launcher)
    except (LaunchError, ValueError, FileNotFoundError) as exc:
        print(f"megalora layout: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
