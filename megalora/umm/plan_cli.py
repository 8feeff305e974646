"""The ``megalora plan`` command: the TP/PP/DP layouts of a run that fit a GPU count, best first.

It also says why the others do not. The byte and time model and the search are
``megalora.umm.plan``.

    megalora plan --config launch/configs/emu2_37b.yaml                 # fewest 80 GB GPUs
    megalora plan --config launch/configs/emu2_37b.yaml --gpus 16 --gpu-memory 80
"""

from __future__ import annotations

from typing import Optional

from megalora.umm.config import RunConfig
from megalora.umm.plan import (GB, Hardware, encoder_activation_bytes, encoder_images, search,
                               smallest_gpu_count, stage_counts)


def _gb(x: float) -> str:
    return f"{x / GB:7.2f}"


def _encoder_line(run: RunConfig, whole) -> list:
    """One line on the in-loop encoder (none when features are precomputed)."""
    v = run.vision
    if not v.enabled:
        return []
    images = encoder_images(run)
    kept = encoder_activation_bytes(run, 1, whole, images)
    return [f"encoder in the loop ({v.kind}): {whole.vision_frozen / 1e9:.2f}B frozen parameters "
            f"(included above), up to {images} images per microbatch; "
            + (f"adapted: it keeps {kept / GB:.1f} GB of activations per microbatch at TP=1"
               if whole.vision_rank_sum else "not adapted: it keeps no activations")]


def report(run: RunConfig, gpus: int, hw: Hardware, global_batch: int, cuda: bool = True,
           flash: bool = True, show: int = 10) -> str:
    fits, rejected = search(run, gpus, hw, global_batch, cuda, flash)
    m = run.model
    whole = stage_counts(run, 1, 1, 0)
    tokens = global_batch * run.data.seq_length
    lines = [f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} "
             f"heads, FFN {m.ffn_hidden_size}: {whole.frozen / 1e9:.2f}B frozen parameters, "
             f"{whole.lora / 1e6:.2f}M LoRA parameters ({whole.lora_modules} adapted modules)",
             f"step: global batch {global_batch} x {run.data.seq_length} tokens; "
             f"{'bf16' if cuda and run.train.bf16 else 'fp32'} base, optimizer "
             f"{run.train.optimizer}, attention {'flash' if flash else 'unfused'}",
             *_encoder_line(run, whole),
             f"GPUs: {gpus} x {hw.gpu_memory_gb:g} GB ({hw.usable_bytes / GB:.1f} GB usable: "
             f"{hw.overhead_gb:g} GB overhead, {hw.headroom:.0%} headroom), "
             f"{hw.gpus_per_node} per node", ""]
    if fits:
        lines.append("layouts that fit, best first (GB per GPU on the fullest stage; comm = "
                     "GB sent per GPU per step):")
        lines.append(f"{'#':>2}  {'layout':<38} {'peak':>7} {'weights':>7} {'adapter':>7} "
                     f"{'activ':>7} {'logits':>7} {'TP comm':>7} {'PP comm':>7} {'DP comm':>7} "
                     f"{'step s':>7} {'tok/s/GPU':>9}")
        for i, est in enumerate(fits[:show], 1):
            mem = est.memory[est.worst_stage]
            adapter = mem.lora + mem.grads + mem.optimizer
            lines.append(f"{i:>2}  {str(est.layout):<38} {_gb(est.peak)} {_gb(mem.weights)} "
                         f"{_gb(adapter)} {_gb(mem.activations)} {_gb(mem.logits)} "
                         f"{_gb(est.comm['tp'])} {_gb(est.comm['pp'])} {_gb(est.comm['dp'])} "
                         f"{est.seconds:7.2f} {tokens / est.seconds / gpus:9.0f}")
        if len(fits) > show:
            lines.append(f"    ... {len(fits) - show} more that fit")
        lines += ["", "best layout, stage by stage (GB): " + "; ".join(
            f"stage {i}: weights {mem.weights / GB:.2f}, LoRA {mem.lora / GB:.3f}, grads "
            f"{mem.grads / GB:.3f}, optimizer {mem.optimizer / GB:.3f}, activations "
            f"{mem.activations / GB:.2f}, logits {mem.logits / GB:.2f}"
            for i, mem in enumerate(fits[0].memory))]
    else:
        lines.append(f"nothing fits on {gpus} GPUs")
    if rejected:
        lines += ["", "layouts that do not fit or are invalid:"]
        lines += [f"  {name:<24} {why}" for name, why in rejected]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory, communication and the layouts that fit")
    p.add_argument("--config", required=True, help="run config YAML (launch/configs/*.yaml)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPU count (default: the fewest that fit)")
    p.add_argument("--gpu-memory", type=float, default=Hardware.gpu_memory_gb,
                   help="GB per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node)
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step, held fixed across layouts (default: "
                        "train.micro_batch_size x train.num_microbatches x the DP of the "
                        "config's own TP x PP on --gpus GPUs)")
    p.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                   help="flash (TE/cuDNN, the GPU path) or unfused (keeps s^2 probabilities)")
    p.add_argument("--show", type=int, default=10, help="how many fitting layouts to list")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.seq_length=4096")


def default_global_batch(run: RunConfig, gpus: Optional[int]) -> int:
    """What the config trains per step on ``gpus`` GPUs: micro-batch x microbatches x the
    data-parallel size of its own TP x PP (one replica when that does not divide)."""
    per_replica = run.train.micro_batch_size * run.train.num_microbatches
    model_parallel = run.parallel.tensor_parallel * run.parallel.pipeline_parallel
    if gpus and gpus % model_parallel == 0:
        return per_replica * (gpus // model_parallel)
    return per_replica


def run(args) -> int:
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    if cfg.model.emu2_checkpoint:
        from megalora.umm.emu2 import resolve_vocab
        cfg = resolve_vocab(cfg)  # model.extra_vocab: null -> read from the checkpoint
    hw = Hardware(gpu_memory_gb=args.gpu_memory, gpus_per_node=args.gpus_per_node)
    if args.gpus is not None and args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    if args.global_batch is not None and args.global_batch < 1:
        raise ValueError(f"--global-batch must be >= 1, got {args.global_batch}")
    flash = args.attention == "flash"
    gpus = args.gpus
    if gpus is None:
        gpus = smallest_gpu_count(cfg, hw, args.global_batch or default_global_batch(cfg, None),
                                  flash=flash)
        print(f"fewest {hw.gpu_memory_gb:g} GB GPUs that fit: {gpus}")
    global_batch = args.global_batch or default_global_batch(cfg, gpus)
    print(report(cfg, gpus, hw, global_batch, flash=flash, show=args.show))
    return 0
