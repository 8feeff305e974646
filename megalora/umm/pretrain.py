"""``megalora pretrain``: train every parameter of a small UMM from its random init, to give LoRA
a pretrained base to adapt; then ``model.base_checkpoint`` loads it in any run config.

    megalora pretrain --config emojicap_base          # -> out/emojicap_base/base.safetensors

One process (TP = PP = 1), on the CPU or one GPU, with AdamW on all parameters and the
trainer's schedule (warmup, cosine to ``min_lr``), data streams and loss. Every
``train.save_every`` steps it writes a checkpoint (model, optimizer, data position, RNG)
atomically; a restart resumes from it exactly. A non-finite loss or gradient stops it with
nothing saved. The base file holds every tensor of the model's state (safetensors) and the
model section of the config it was trained with; loading it checks both.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from megalora.errors import NonFiniteError
from megalora.umm.base_checkpoint import BASE_FILE, check_layout, save_base
from megalora.umm.config import RunConfig

STATE_FILE = "pretrain_state.pt"


def _save_state(path, step, model, opt, stream):
    from megalora.atomic import atomic_write

    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "stream": stream.state_dict(), "rng": torch.get_rng_state()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def pretrain(run: RunConfig, progress=print, max_steps_this_run: int = 0) -> dict:
    """Train every parameter per ``run``; returns {"step", "losses", "eval", "base"}."""
    from megalora.umm.model import build_umm, loss_convention
    from megalora.umm.optim import loss_scalars, lr_at
    from megalora.umm.session import (build_datasets, build_streams, evaluate,
                                      forward_backward, parallel_session)

    from megalora.config import LoRAConfig

    check_layout(run, "pretraining")
    run = dataclasses.replace(run, lora=LoRAConfig())  # no adapters: nothing routes tokens
    t = run.train
    os.makedirs(t.out_dir, exist_ok=True)
    state_path = os.path.join(t.out_dir, STATE_FILE)
    with parallel_session(run) as device:
        torch.manual_seed(t.seed)
        cuda = device.type == "cuda"
        model = build_umm(run, dtype=torch.bfloat16 if cuda and t.bf16 else torch.float32,
                          cpu=not cuda).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        stream, evals = build_streams(run, *build_datasets(run))
        start = 0
        if t.resume and os.path.exists(state_path):
            saved = torch.load(state_path, weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            stream.load_state_dict(saved["stream"])
            torch.set_rng_state(saved["rng"])
            start = saved["step"]
            progress(f"resumed from {state_path} at step {start}")
        progress(f"pretraining all {sum(p.numel() for p in params):,} parameters; "
                 + loss_convention(run))
        losses = []
        end = t.steps if not max_steps_this_run else min(t.steps, start + max_steps_this_run)
        for step in range(start, end):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps,
                                    total=t.steps)
            batches = [stream.next_batch().to(device) for _ in range(t.num_microbatches)]
            scalars = loss_scalars(forward_backward(model, run, batches))
            norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad or math.inf))
            if not (math.isfinite(scalars["loss"]) and math.isfinite(norm)):
                raise NonFiniteError(f"step {step + 1}: loss {scalars['loss']}, gradient norm "
                                     f"{norm}: lower train.lr; the last checkpoint is kept")
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append({"text": scalars["text"], "image": scalars["image"]})
            if (step + 1) % t.log_every == 0 or step == start:
                progress(f"step {step + 1:5d}  text {scalars['text']:.4f}  image "
                         f"{scalars['image']:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                         f"grad {norm:.3f}")
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps:
                _save_state(state_path, step + 1, model, opt, stream)
        if end < t.steps:  # stopped early on purpose: the checkpoint resumes it
            _save_state(state_path, end, model, opt, stream)
            return {"step": end, "losses": losses, "eval": None, "base": None}
        held_out = evaluate(model, run, evals, device) if evals is not None else None
        base = save_base(model, run, os.path.join(t.out_dir, BASE_FILE))
        if os.path.exists(state_path):
            os.remove(state_path)
        if held_out:
            progress(f"held-out: text {held_out['text']:.4f}  image {held_out['image']:.4f}")
        progress(f"base saved to {base} (model.base_checkpoint: {base})")
        return {"step": end, "losses": losses, "eval": held_out, "base": base}


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train every parameter of a small UMM (one process): a "
                                        "base for LoRA (model.base_checkpoint)")
    p.add_argument("--config", required=True, help="run config (path or launch/configs name)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.set_defaults(handler=run_cli)


def run_cli(args, progress=print) -> int:
    from megalora.umm.config import RunConfig

    pretrain(RunConfig.from_yaml(args.config, args.overrides), progress)
    return 0
