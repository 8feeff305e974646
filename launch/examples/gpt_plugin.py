"""The plugin API alone, on a plain megatron-core GPTModel: what a Megatron user adds to their
own training loop to fine-tune with megalora (no megalora trainer involved).

    torchrun --nproc_per_node=2 launch/examples/gpt_plugin.py            # TP=2 + SP on 2 CPUs
    torchrun --nproc_per_node=2 launch/examples/gpt_plugin.py --pp 2 --tp 1 --no-sp
    make demo-gpt

A frozen, randomly initialised GPT learns a two-modality synthetic task: in "text" spans the
next token is t + 1, in "image" spans it is 3 t + 7 (mod vocab). Nothing in the tokens says
which span is which; only the per-token modality ids routing the two B heads of each adapter
do, so the loss can only fall if the routing works. The steps:

1. build the model as usual (here on CPU: ``megalora.cpu`` lets megatron-core run there);
2. ``megalora.apply_lora(model, LoRAConfig(...))`` before any DDP wrapping;
3. in the forward step, ``megalora.set_head_ids(model, modality_ids)`` ([batch, seq]);
4. after backward, ``megalora.finalize_lora_grads(model)`` (without Megatron's DDP, which
   would do it), then any optimizer over the trainable (adapter) parameters;
5. ``megalora.save_adapter(model, path)``: loadable at any TP/PP layout.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import megalora

VOCAB, SEQ = 64, 32


def synthetic_batch(gen: torch.Generator, batch: int):
    """(tokens, labels, modality ids), each [batch, SEQ]: the two-rule task above."""
    tokens = torch.empty(batch, SEQ, dtype=torch.long)
    modality = torch.zeros(batch, SEQ, dtype=torch.long)
    for row in range(batch):
        cut = int(torch.randint(SEQ // 4, 3 * SEQ // 4, (1,), generator=gen))
        first = int(torch.randint(0, 2, (1,), generator=gen))
        modality[row, :cut], modality[row, cut:] = first, 1 - first
        for start, end in ((0, cut), (cut, SEQ)):
            tok = int(torch.randint(0, VOCAB, (1,), generator=gen))
            for pos in range(start, end):
                tokens[row, pos] = tok
                tok = next_token(tok, int(modality[row, pos]))
    labels = torch.empty_like(tokens)
    labels[modality == 0] = (tokens[modality == 0] + 1) % VOCAB
    labels[modality == 1] = (3 * tokens[modality == 1] + 7) % VOCAB
    return tokens, labels, modality


def next_token(tok: int, modality: int) -> int:
    return (tok + 1) % VOCAB if modality == 0 else (3 * tok + 7) % VOCAB


def build_gpt(args):
    """This rank's pipeline stage of a tiny GPTModel, the same base at any layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalora.base_init import init_base_deterministic
    from megalora.cpu import cpu_gpt_block_spec

    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sp, attention_dropout=0.0, hidden_dropout=0.0,
        activation_func=F.gelu, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, pipeline_dtype=torch.float32)
    model = GPTModel(config=config, transformer_layer_spec=cpu_gpt_block_spec(config),
                     vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=False,
                     position_embedding_type="learned_absolute")
    init_base_deterministic(model, seed=args.seed, std=0.1)
    return model, config


def forward_step(data_iterator, model):
    tokens, labels, modality = next(data_iterator)
    megalora.set_head_ids(model, modality)  # [batch, seq]: text -> head 0, image -> head 1
    b, s = tokens.shape
    mask = torch.tril(torch.ones(s, s)).bool().logical_not()[None, None]
    out = model(tokens, torch.arange(s).expand(b, s), mask, labels=labels)

    def loss_func(per_token):  # with labels, the last stage returns the per-token loss
        loss = per_token.float().mean()
        # a clone: the schedule divides the returned loss in place by the microbatch count
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def train(args) -> dict:
    """Train on this process group (already initialised); returns the losses and the path."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                 pipeline_model_parallel_size=args.pp)
    model, config = build_gpt(args)
    report = megalora.apply_lora(model, megalora.LoRAConfig(
        rank=8, alpha=16.0, num_heads=2, routing="modality", dropout=0.05,
        target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
    rank0 = dist.get_rank() == 0
    if rank0:
        print(report, flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen, losses, t0 = torch.Generator().manual_seed(args.seed + 1), [], time.time()
    for step in range(1, args.steps + 1):
        batches = [synthetic_batch(gen, 4) for _ in range(2)]
        opt.zero_grad(set_to_none=True)
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=4)
        megalora.finalize_lora_grads(model)  # the SP partial sums of the replicated factors
        opt.step()
        loss = torch.tensor([sum(float(o["loss"]) for o in out) / max(len(out), 1)])
        dist.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())  # the last stage's
        losses.append(float(loss))
        if rank0 and (step % 5 == 0 or step == 1):
            print(f"step {step:4d}/{args.steps}  loss {losses[-1]:.4f}  "
                  f"({time.time() - t0:.1f}s)", flush=True)
    path = os.path.join(args.out, "adapter.safetensors")
    megalora.save_adapter(model, path)
    if rank0:
        print(f"loss {sum(losses[:5]) / 5:.3f} (first 5 steps) -> {sum(losses[-5:]) / 5:.3f} "
              f"(last 5); adapter saved to {path}", flush=True)
    return {"losses": losses, "adapter": path}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--no-sp", dest="sp", action="store_false", help="no sequence parallelism")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/gpt_plugin")
    args = p.parse_args(argv)
    args.sp = args.sp and args.tp > 1
    return args


def main(argv=None) -> None:
    from megatron.core import parallel_state as ps

    from megalora.cpu import cpu_megatron

    args = parse(argv)
    dist.init_process_group("gloo")  # under torchrun; on GPUs: "nccl", model.cuda(), no harness
    try:
        with cpu_megatron():  # megatron-core on CPU (this example runs on CPUs)
            train(args)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
