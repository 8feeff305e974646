"""One LoRA training step of a tiny megatron-core GPT, as run by every topology test.

The base model is float64 and identical at every layout (``build_tiny_gpt``); megatron's
vocab-parallel cross-entropy works in float32, which bounds how closely TP layouts can agree
(about 1e-7 relative); pipeline-only layouts agree exactly.
"""

import torch

VARIANTS = {
    "modality": dict(rank=4, alpha=8.0, num_heads=2, routing="modality", dropout=(0.1, 0.2),
                     init_b="gaussian"),
    "router": dict(rank=3, alpha=3.0, num_heads=3, routing="router", router_top_k=2,
                   init_b="gaussian"),
}


def batches(n_micro=4, b=2, s=16, vocab=128, seed=0):
    from megalora.testing.tiny_gpt import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_micro):
        ids = torch.randint(-1, 2, (b, s), generator=g)
        if i % 2:  # contiguous modality spans as well as interleaved tokens
            ids = torch.zeros(b, s, dtype=torch.long)
            ids[:, s // 2:] = 1
            ids[:, :2] = -1
        out.append(Batch(torch.randint(0, vocab, (b, s), generator=g),
                         torch.randint(0, vocab, (b, s), generator=g), ids))
    return out


def lora_step(tp, pp, sp, variant, recompute=False, finalize=True, tape=True, backend="torch",
              dtype=torch.float64):
    """Build, adapt, one forward/backward/SGD step. Returns loss, full grads, full adapter.

    ``tape=False`` switches off the layers' recompute state tape (a sensitivity check)."""
    import megalora
    from megalora.grads import full_lora_grads
    from megalora.testing.tiny_gpt import (TinyGPTShape, broadcast_last_stage, build_tiny_gpt,
                                           forward_backward, mean_loss, tiny_gpt_config)
    from megatron.core import parallel_state as ps

    from megalora.runtime import LayerStateTape

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    resolve = LayerStateTape.resolve
    if not tape:
        LayerStateTape.resolve = lambda self, current: current
    try:
        shape = TinyGPTShape()
        cfg = tiny_gpt_config(shape, tp, pp, sp, dtype=dtype, recompute=recompute)
        model = build_tiny_gpt(shape, cfg, seed=7)
        megalora.apply_lora(model, megalora.LoRAConfig(backend=backend, **VARIANTS[variant]))
        data = batches()
        if variant != "modality":
            for b in data:
                b.head_ids = None
        model.train()
        losses = forward_backward(model, data, cfg)
        partial = full_lora_grads(model)
        if finalize:
            megalora.finalize_lora_grads(model)
        grads = full_lora_grads(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        opt.step()
        replicated = {p.name: p.param.detach().clone()
                      for p in megalora.lora_parameters(model) if not p.tp_sharded}
        return {"loss": broadcast_last_stage(mean_loss(losses)), "grads": grads,
                "partial": partial, "adapter": megalora.adapter_state(model),
                "replicated": replicated}
    finally:
        LayerStateTape.resolve = resolve
        ps.destroy_model_parallel()


def merged(results, key):
    """Union over ranks of a per-stage dict (each PP stage holds its own layers)."""
    out = {}
    for r in results:
        out.update(r[key])
    return out
