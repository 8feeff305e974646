"""The small main job: LoRA fine-tuning of a tiny megatron-core GPT on CPU, under torchrun.

    torchrun --nproc_per_node=2 -m megalora.demo --config launch/configs/gpt_tiny.yaml

A frozen, randomly initialised GPT learns a two-modality synthetic task: in "text" spans the next
token is ``t + 1``, in "image" spans it is ``3 t + 7`` (mod vocab). Nothing in the tokens says
which span is which; only the per-token modality ids routing the two B heads of each adapter do,
so the loss can only fall if the routing works. It runs Megatron's own forward/backward
schedule (tensor, sequence and pipeline parallel as configured), reduces the replicated
factors' gradients, steps AdamW on the adapters only, prints the loss, and saves the adapter
atomically. On a machine with GPUs the same script runs with NCCL (``device: cuda``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megalora.config import LoRAConfig


@dataclass
class ParallelConfig:
    tensor_parallel: int = 2
    """Tensor-parallel size (must divide the world size)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (must divide the number of layers)."""
    sequence_parallel: bool = True
    """Split activations along the sequence between TP ranks (needs tensor_parallel > 1)."""


@dataclass
class TrainConfig:
    steps: int = 50
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per microbatch."""
    num_microbatches: int = 2
    """Microbatches per step (gradient accumulation / pipeline depth)."""
    lr: float = 1e-2
    """AdamW learning rate (adapters only)."""
    log_every: int = 5
    """Print the loss every this many steps."""
    seed: int = 0
    """Seed for the base model and the data."""
    out_dir: str = "out/gpt_tiny"
    """Where the adapter is written (``adapter.safetensors``)."""
    device: str = "cpu"
    """``cpu`` (gloo, CPU harness) or ``cuda`` (NCCL, one GPU per rank)."""


@dataclass
class DemoConfig:
    model: dict = field(default_factory=dict)
    """TinyGPTShape fields: num_layers, hidden_size, num_attention_heads, vocab_size, ..."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(num_heads=2, routing="modality"))
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.parallel.sequence_parallel and self.parallel.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.lora.routing == "modality" and self.lora.num_heads < 2:
            raise ValueError("the demo task has two modalities: set lora.num_heads >= 2")
        if self.train.device not in ("cpu", "cuda"):
            raise ValueError(f"train.device must be 'cpu' or 'cuda', got {self.train.device!r}")
        for name in ("steps", "micro_batch_size", "num_microbatches", "log_every"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[List[str]] = None) -> "DemoConfig":
        import yaml

        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
        for item in overrides or []:  # section.key=value, value parsed as YAML
            key, _, value = item.partition("=")
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = yaml.safe_load(value)
        unknown = set(raw) - {"model", "parallel", "lora", "train"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected model, "
                             "parallel, lora, train")
        return cls(model=dict(raw.get("model", {})),
                   parallel=_build(ParallelConfig, raw.get("parallel", {}), "parallel"),
                   lora=LoRAConfig.from_dict(raw.get("lora", {})),
                   train=_build(TrainConfig, raw.get("train", {}), "train"))


def _build(cls, values: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {section} field(s) {unknown}; valid: {sorted(names)}")
    return cls(**values)


def synthetic_batch(generator: torch.Generator, batch: int, seq: int, vocab: int):
    """Tokens, next-token labels and modality ids for the two-rule task (see module doc)."""
    from megalora.testing.tiny_gpt import Batch

    tokens = torch.empty(batch, seq, dtype=torch.long)
    modality = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        cut = int(torch.randint(seq // 4, 3 * seq // 4, (1,), generator=generator))
        first = int(torch.randint(0, 2, (1,), generator=generator))
        modality[row, :cut], modality[row, cut:] = first, 1 - first
        for start, end in ((0, cut), (cut, seq)):
            tok = int(torch.randint(0, vocab, (1,), generator=generator))
            for pos in range(start, end):
                tokens[row, pos] = tok
                tok = _rule(tok, int(modality[row, pos]), vocab)
    labels = torch.empty_like(tokens)
    for m in (0, 1):
        labels[modality == m] = (tokens[modality == m] + 1) % vocab if m == 0 else \
            (3 * tokens[modality == m] + 7) % vocab
    return Batch(tokens, labels, modality)


def _rule(tok: int, modality: int, vocab: int) -> int:
    return (tok + 1) % vocab if modality == 0 else (3 * tok + 7) % vocab


def _init_distributed(cfg: DemoConfig):
    from megatron.core import parallel_state as ps

    backend = "nccl" if cfg.train.device == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("run under torchrun, e.g. torchrun --nproc_per_node=2 -m "
                               "megalora.demo --config launch/configs/gpt_tiny.yaml")
        dist.init_process_group(backend)
    world, tp, pp = dist.get_world_size(), cfg.parallel.tensor_parallel, \
        cfg.parallel.pipeline_parallel
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel ({tp}) x "
                         f"pipeline_parallel ({pp})")
    if cfg.train.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def run(cfg: DemoConfig, before_optimizer_step: Optional[List[Callable]] = None) -> dict:
    """Train; returns {"losses": [...], "adapter": path}. ``before_optimizer_step`` callbacks
    get the model after gradients are final and before the step (per-objective methods hook in
    here)."""
    import megalora
    from megalora.testing.cpu import cpu_megatron
    from megalora.testing.tiny_gpt import (TinyGPTShape, broadcast_last_stage, build_tiny_gpt,
                                           forward_backward, mean_loss, tiny_gpt_config)

    _init_distributed(cfg)
    rank0 = dist.get_rank() == 0
    if rank0:  # megalora's one-line notices (kernel path, TE availability) on rank 0
        logging.getLogger("megalora").setLevel(logging.INFO)
        if not logging.getLogger("megalora").handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logging.getLogger("megalora").addHandler(handler)
    harness = cpu_megatron() if cfg.train.device == "cpu" else contextlib.nullcontext()
    with harness:
        shape = TinyGPTShape(**cfg.model)
        mcfg = tiny_gpt_config(shape, cfg.parallel.tensor_parallel,
                               cfg.parallel.pipeline_parallel, cfg.parallel.sequence_parallel)
        model = build_tiny_gpt(shape, mcfg, seed=cfg.train.seed)
        if cfg.train.device == "cuda":
            model.cuda()
        report = megalora.apply_lora(model, cfg.lora)
        if rank0:
            print(report, flush=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        losses, start = [], time.time()
        model.train()
        for step in range(1, cfg.train.steps + 1):
            batches = [synthetic_batch(gen, cfg.train.micro_batch_size, shape.seq_length,
                                       shape.vocab_size)
                       for _ in range(cfg.train.num_microbatches)]
            if cfg.lora.routing != "modality":  # the ids only steer modality-routed heads
                for batch in batches:
                    batch.head_ids = None
            opt.zero_grad(set_to_none=True)
            out = forward_backward(model, batches, mcfg)
            megalora.finalize_lora_grads(model)
            for callback in before_optimizer_step or []:
                callback(model)
            opt.step()
            losses.append(broadcast_last_stage(mean_loss(out)))
            if rank0 and (step % cfg.train.log_every == 0 or step == 1):
                print(f"step {step:4d}/{cfg.train.steps}  loss {losses[-1]:.4f}  "
                      f"({time.time() - start:.1f}s)", flush=True)
        path = os.path.join(cfg.train.out_dir, "adapter.safetensors")
        megalora.save_adapter(model, path, extra={"steps": str(cfg.train.steps)})
    if rank0:
        first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
        print(f"loss fell from {first:.3f} (first 5 steps) to {last:.3f} (last 5); adapter "
              f"saved to {path}", flush=True)
    return {"losses": losses, "adapter": path}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="launch/configs/gpt_tiny.yaml",
                        help="YAML run config (sections: model, parallel, lora, train)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=20")
    args = parser.parse_args(argv)
    cfg = DemoConfig.from_yaml(args.config, args.overrides)
    try:
        run(cfg)
    finally:
        from megatron.core import parallel_state as ps

        if ps.is_initialized():
            ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
