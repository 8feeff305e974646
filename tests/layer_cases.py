"""One adapted Megatron linear, built the same way in the test process and in spawned ranks.

Full tensors come from a seeded generator, so every rank and the float64 reference see the same
numbers; with ``integer=True`` they are small integers (and dropout p=0.5 scales by exactly 2),
so sums are exact in float64 whatever the reduction order: TP results can be compared with
``torch.equal``.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

from megalora.config import LoRAConfig
from megalora.reference import DropoutSpec, multi_b_lora_ref
from megalora.sharding import FactorSharding, factor_shardings, shard, unshard


@dataclass(frozen=True)
class LayerCase:
    kind: str                      # "column" | "row"
    routing: str = "single"        # "single" | "modality" | "router"
    heads: int = 1
    din: int = 96
    dout: int = 40
    rank: int = 3
    seq: int = 7
    batch: int = 3
    dropout: float = 0.0
    stride: int = 1                # 2: a SwiGLU-style fc1 ([gate; up] split per rank)
    top_k: Optional[int] = None
    integer: bool = True
    seed: int = 0
    backend: str = "torch"
    dtype: torch.dtype = torch.float64   # the layer's dtype (the reference is always float64)

    @property
    def name(self):
        return "linear_fc1" if self.kind == "column" else "linear_fc2"

    def with_tp_shapes(self):
        return replace(self, seq=10)  # sequence must split over TP=2 for SP


def make_tensors(case: LayerCase) -> dict:
    g = torch.Generator().manual_seed(case.seed)

    def rnd(*shape):
        if case.integer:
            return torch.randint(-2, 3, shape, generator=g).double()
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    k = case.heads
    return {
        "x": rnd(case.seq, case.batch, case.din), "dy": rnd(case.seq, case.batch, case.dout),
        "w": rnd(case.dout, case.din), "bias": rnd(case.dout),
        "lora_A": rnd(case.rank, case.din), "lora_B": rnd(k, case.dout, case.rank),
        "lora_router": torch.randn(k, case.din, generator=g, dtype=torch.float64) * 0.1,
        "ids": torch.randint(-1, k, (case.batch, case.seq), generator=g),
    }


def lora_config(case: LayerCase, dtype: Optional[str] = None) -> LoRAConfig:
    return LoRAConfig(rank=case.rank, alpha=float(case.rank), num_heads=case.heads,
                      routing=case.routing, router_top_k=case.top_k, dropout=case.dropout,
                      target_modules=(case.name,), seed=case.seed, dtype=dtype,
                      backend=case.backend)


def reference(case: LayerCase, t: dict, dropout_seed: Optional[int]) -> dict:
    """Output and gradients of the whole layer on one process, float64 autograd."""
    x = t["x"].clone().requires_grad_()
    params = {n: t[n].clone().requires_grad_() for n in ("lora_A", "lora_B", "lora_router")}
    ids = t["ids"].t().reshape(-1) if case.routing == "modality" else None
    spec = DropoutSpec((case.dropout,), dropout_seed) if case.dropout else None
    y = multi_b_lora_ref(x.reshape(-1, case.din), t["w"], t["bias"], params["lora_A"],
                         params["lora_B"], 1.0, head_ids=ids,
                         router=params["lora_router"] if case.routing == "router" else None,
                         top_k=case.top_k, dropout=spec)
    y = y.reshape(case.seq, case.batch, case.dout)
    (y * t["dy"]).sum().backward()
    out = {"out": y.detach(), "x.grad": x.grad, "lora_A": params["lora_A"].grad,
           "lora_B": params["lora_B"].grad}
    if case.routing == "router":
        out["lora_router"] = params["lora_router"].grad
    return out


def build(case: LayerCase, t: dict, tp: int, sp: bool):
    """A ModuleDict holding the adapted base layer with the case's full tensors sharded in."""
    import megalora
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                              params_dtype=case.dtype, use_cpu_initialization=True)
    rank = ps.get_tensor_model_parallel_rank()
    zeros = torch.nn.init.zeros_
    if case.kind == "column":
        base = ColumnParallelLinear(case.din, case.dout, config=cfg, init_method=zeros,
                                    bias=True, gather_output=False, stride=case.stride)
        w_spec = FactorSharding(0, case.stride)
        bias = shard(t["bias"], FactorSharding(0, case.stride), rank, tp)
    else:
        base = RowParallelLinear(case.din, case.dout, config=cfg, init_method=zeros, bias=True,
                                 input_is_parallel=True, skip_bias_add=True)
        w_spec, bias = FactorSharding(1), t["bias"]
    with torch.no_grad():
        base.weight.copy_(shard(t["w"], w_spec, rank, tp))
        base.bias.copy_(bias)
    holder = torch.nn.ModuleDict({case.name: base})
    report = megalora.apply_lora(holder, lora_config(case))
    layer = holder[case.name]
    specs = factor_shardings(layer.lora_base_split)
    with torch.no_grad():
        for name, param in layer.lora_parameters().items():
            param.copy_(shard(t[name], specs[name], rank, tp))
    return holder, layer, report


def local_input(case, t, layer):
    base = layer.lora_base_split
    x = t["x"].to(case.dtype)
    if base.kind == "column" and base.sequence_parallel:
        n = case.seq // base.tp_size
        x = x[base.tp_rank * n:(base.tp_rank + 1) * n]
    if base.kind == "row":
        n = case.din // base.tp_size
        x = x[..., base.tp_rank * n:(base.tp_rank + 1) * n]
    return x.clone().contiguous()


def local_grad_out(case, t, layer):
    base = layer.lora_base_split
    dy = t["dy"].to(case.dtype)
    if base.kind == "column":
        dy = shard(dy, FactorSharding(2, case.stride), base.tp_rank, base.tp_size)
    elif base.sequence_parallel:
        n = case.seq // base.tp_size
        dy = dy[base.tp_rank * n:(base.tp_rank + 1) * n]
    return dy.contiguous()


def run_layer(case: LayerCase, t: dict, tp: int, sp: bool, holder=None, layer=None) -> dict:
    """Forward + backward of the adapted layer on this rank; returns full-size results."""
    import megalora
    import torch.distributed as dist
    from megalora.grads import full_lora_grads
    from megalora.comm import all_gather_dim0

    if holder is None:
        holder, layer, _ = build(case, t, tp, sp)
    if case.routing == "modality":
        megalora.set_head_ids(holder, t["ids"])
    holder.train()
    x = local_input(case, t, layer).requires_grad_()
    out, bias = layer(x)
    if bias is not None:
        out = out + bias
    (out * local_grad_out(case, t, layer)).sum().backward()
    megalora.finalize_lora_grads(holder)
    base, group = layer.lora_base_split, layer.lora_base_split.tp_group
    grads = full_lora_grads(holder)
    res = {k.rsplit(".", 1)[-1]: v.double() for k, v in grads.items()}
    if base.kind == "column":
        pieces = [torch.empty_like(out) for _ in range(tp)]
        if tp > 1:
            dist.all_gather(pieces, out.detach().contiguous(), group=group)
        else:
            pieces = [out.detach()]
        res["out"] = unshard(pieces, FactorSharding(2, case.stride))
        xg = x.grad
        res["x.grad"] = all_gather_dim0(xg, group) if sp else xg
    else:
        res["out"] = all_gather_dim0(out.detach(), group) if sp else out.detach()
        pieces = [torch.empty_like(x.grad) for _ in range(tp)]
        if tp > 1:
            dist.all_gather(pieces, x.grad.contiguous(), group=group)
        else:
            pieces = [x.grad]
        res["x.grad"] = torch.cat(pieces, dim=-1)
    res = {k: (v.double() if torch.is_tensor(v) else v) for k, v in res.items()}
    res["dropout_seed"] = _dropout_seed(layer)
    return res


def _dropout_seed(layer):
    from megalora.runtime import layer_dropout_seed

    return layer_dropout_seed(layer._lora_runtime.seed, layer._lora_name_hash,
                              layer._lora_runtime.forward_count)
