"""Parallel LoRA layers: a mixin that turns a Megatron (or TE) linear into an adapted one.

``apply_lora`` swaps an existing layer's class for ``LoRA<BaseClass>`` (a subclass made of
``LoRAMixin`` + the base class) and adds the adapter parameters. Swapping the class rather than
wrapping the module keeps every base parameter at its original name (``...linear_qkv.weight``,
so base checkpoints load unchanged), keeps ``isinstance`` checks inside Megatron true, and keeps
the ``(output, bias)`` return contract. Adapter parameters sit beside the base ones:
``lora_A`` [r, in(/TP)], ``lora_B`` [K, out(/TP), r], ``lora_router`` [K, in(/TP)].

The sharding rule (comm-optimal, see ``megalora.sharding``):
column base: A replicated, B split on out; row base: A split on in, B replicated. Forward moves
one rank-r activation per layer (an all-gather or all-reduce for column, a reduce-scatter or
all-reduce for row) and backward its mirror; nothing of width ``hidden`` crosses ranks.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, Optional

import torch

from megalora import comm, ops
from megalora.base_layers import BaseLinearSplit
from megalora.config import ModuleLoRASettings
from megalora.reference import DropoutSpec, router_weights_ref
from megalora.runtime import LayerStateTape, LoRARuntime, layer_dropout_seed
from megalora.sharding import (factor_shardings, global_shapes, set_parallel_attributes, shard)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CLASS_CACHE: Dict[type, type] = {}


def _unpack(result, style: str):
    """Normalise a base forward's return to (out, bias, layernorm_out)."""
    if style == "te_ln":
        if isinstance(result, tuple) and len(result) == 3:  # TE with return_bias
            return result
        (out, ln_out), bias = result
        return out, bias, ln_out
    out, bias = result
    return out, bias, None


def _repack(out, bias, ln_out, style: str, want_ln: bool, three_tuple: bool):
    if style == "te_ln" and want_ln:
        return (out, bias, ln_out) if three_tuple else ((out, ln_out), bias)
    return out, bias


class LoRAMixin:
    """Adapter maths around a base linear's forward. Built by ``apply_lora``, not directly."""

    _lora_ready = False

    # ------------------------------------------------------------------ setup
    def lora_setup(self, *, name: str, settings: ModuleLoRASettings, base_split: BaseLinearSplit,
                   runtime: LoRARuntime, seed: int, init_a: str, init_b: str,
                   dtype: Optional[str], backend: str, deterministic: bool = False) -> None:
        """Create, shard and initialise the adapter parameters of this layer."""
        self.lora_name = name
        self.lora_settings = settings
        self.lora_base_split = base_split
        """How the base linear is split over TP (kind, style, global sizes, TP group)."""
        self.lora_backend = backend
        self.lora_deterministic = deterministic
        self.lora_merged_head: Optional[int] = None
        self.lora_enabled = True
        self.lora_rank_mask: Optional[torch.Tensor] = None
        """[rank] 0/1 (``megalora.hydra.masking``): None = every rank active."""
        self._lora_runtime = runtime
        self._lora_tape = LayerStateTape()
        self._lora_name_hash = zlib.crc32(name.encode())
        pdtype = _DTYPES[dtype] if dtype else self.weight.dtype
        device = self.weight.device
        shardings = factor_shardings(base_split)
        full = self._lora_full_init(seed, init_a, init_b)
        for factor, tensor in full.items():
            local = shard(tensor, shardings[factor], base_split.tp_rank, base_split.tp_size)
            param = torch.nn.Parameter(local.to(device=device, dtype=pdtype))
            set_parallel_attributes(param, shardings[factor], base_split)
            self.register_parameter(factor, param)
        if settings.routing != "router":
            self.lora_router = None
        if base_split.style == "te_ln":
            # TE returns the (local, not gathered) LayerNorm output for the adapter to read.
            self._lora_user_wants_ln = bool(getattr(self, "return_layernorm_output", False))
            self.return_layernorm_output = True
            self.return_layernorm_output_gathered = False
        self._lora_ready = True

    def _lora_full_init(self, seed: int, init_a: str, init_b: str) -> Dict[str, torch.Tensor]:
        """Full-size factors from a generator keyed by (seed, layer name, factor): TP-invariant."""
        s = self.lora_settings
        shapes = global_shapes(self.lora_base_split, s.rank, s.num_heads)

        def gen(factor):
            key = f"{seed}:{self.lora_name}:{factor}".encode()
            return torch.Generator().manual_seed(zlib.crc32(key))

        def kaiming(shape, factor):  # nn.Linear's default: kaiming_uniform(a=sqrt(5))
            bound = 1.0 / math.sqrt(shape[-1])
            return torch.empty(shape).uniform_(-bound, bound, generator=gen(factor))

        def gaussian(shape, factor):
            return torch.empty(shape).normal_(0.0, 1.0 / s.rank, generator=gen(factor))

        out = {"lora_A": kaiming(shapes["lora_A"], "A") if init_a == "kaiming"
               else gaussian(shapes["lora_A"], "A"),
               "lora_B": torch.zeros(shapes["lora_B"]) if init_b == "zeros"
               else gaussian(shapes["lora_B"], "B")}
        if s.routing == "router":
            out["lora_router"] = kaiming(shapes["lora_router"], "router")
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, input_, *args, **kwargs):
        if not self._lora_ready:
            raise RuntimeError(f"{type(self).__name__} was built from a LoRA spec but its adapter "
                               "is not initialised: call megalora.apply_lora(model, config) after "
                               "building the model")
        style = self.lora_base_split.style
        result = super().forward(input_, *args, **kwargs)
        out, bias, ln_out = _unpack(result, style)
        three = isinstance(result, tuple) and len(result) == 3
        want_ln = getattr(self, "_lora_user_wants_ln", False)
        if self.lora_merged_head is None and self.lora_enabled:
            gather = kwargs.get("runtime_gather_output", args[1] if len(args) > 1 else None)
            x = ln_out if style == "te_ln" else input_
            out = self._lora_add(x, out, gather)
        return _repack(out, bias, ln_out, style, want_ln, three)

    def _lora_prepare(self, x: torch.Tensor):
        """(x as [T_local, d_in_local], full head ids, this rank's input head ids, dropout)."""
        base, s = self.lora_base_split, self.lora_settings
        head_ids, count = self._lora_tape.resolve(self._lora_runtime.state())
        x2 = x.reshape(-1, x.shape[-1])
        if base.kind == "row" and not base.input_is_parallel:
            x2 = comm.scatter_last_dim(x2, base.tp_group)
        t_local = x2.shape[0]
        sp_in = base.sequence_parallel and base.kind in ("column", "duplicated")
        t_full = t_local * base.tp_size if sp_in else t_local
        if s.routing != "modality":
            head_ids = None  # e.g. a single-head vision encoder inside a modality-routed model
        elif head_ids is not None:
            seq_full = x.shape[0] * (base.tp_size if sp_in else 1) if x.dim() == 3 else None
            head_ids = self._check_head_ids(head_ids, t_full, seq_full, x)
        else:
            raise RuntimeError(f"{self.lora_name}: routing='modality' needs per-token head ids; "
                               "call megalora.set_head_ids(model, ids) before the forward")
        tok_off = base.tp_rank * t_local if sp_in else 0
        feat_off = base.tp_rank * x2.shape[1] if base.kind == "row" else 0
        ids_in = head_ids[tok_off:tok_off + t_local] if head_ids is not None else None
        return x2, head_ids, ids_in, self._dropout_spec(count, tok_off, feat_off)

    def _lora_add(self, x: torch.Tensor, out: torch.Tensor, runtime_gather_output=None):
        """``out`` + the adapter's contribution (shaped as this rank's base output)."""
        base, s = self.lora_base_split, self.lora_settings
        x2, head_ids, ids_in, drop = self._lora_prepare(x)
        modality = s.routing == "modality"
        z = ops.lora_shrink(x2, self.lora_A, drop, ids_in if modality else None,
                            self.lora_backend,
                            getattr(self.lora_A, "grad_split", None) if modality else None)
        if self.lora_router is not None:
            z = torch.cat([z, x2.to(self.lora_router.dtype) @ self.lora_router.t()], dim=-1)
        z = self._lora_exchange(z)
        logits = z[:, s.rank:] if self.lora_router is not None else None
        z = z[:, :s.rank]
        if self.lora_rank_mask is not None:  # HyDRA: ranks beyond the allocation are off
            z = z * self.lora_rank_mask.to(device=z.device, dtype=z.dtype)
        ids_out = None
        if s.routing == "modality":
            ids_out = head_ids
            if base.kind != "column" and base.sequence_parallel:  # row/dup output is a seq shard
                n = z.shape[0]
                ids_out = head_ids[base.tp_rank * n:(base.tp_rank + 1) * n]
        weights = router_weights_ref(logits, s.router_top_k) if logits is not None else None
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        gather = gather and base.kind == "column"
        target = self._inplace_target(z, out, gather)
        y = ops.lora_expand(z, self.lora_B, s.scale, ids_out, weights, self.lora_backend,
                            self.lora_deterministic, out=target)
        if target is not None:  # added into the base output in place (fused epilogue)
            return y
        if gather:
            y = comm.gather_last_dim(y, base.tp_group)
        return out + y.reshape(out.shape).to(out.dtype)

    def _inplace_target(self, z, out, gather) -> Optional[torch.Tensor]:
        """``out`` itself when the fused kernels can add into it in place: Triton backend,
        a Megatron-core base (its autograd keeps no reference to its output), no gathered
        output, contiguous memory."""
        # a view (e.g. a collective that returned its input as-is at TP=1) cannot be modified in
        # place under autograd
        if gather or self.lora_base_split.style != "mcore" or not out.is_contiguous() or \
                out._is_view():
            return None
        if ops.resolve_backend(self.lora_backend, z.device, self.lora_B.dtype) != "triton":
            return None
        return out

    def _lora_exchange(self, z: torch.Tensor) -> torch.Tensor:
        """The one TP collective of the adapter (rank-r activations only)."""
        base = self.lora_base_split
        if base.kind == "column":
            return (comm.gather_seq(z, base.tp_group) if base.sequence_parallel
                    else comm.copy_to_tp(z, base.tp_group))
        if base.kind == "row":
            return (comm.reduce_scatter_seq(z, base.tp_group) if base.sequence_parallel
                    else comm.reduce_from_tp(z, base.tp_group))
        return z

    def _check_head_ids(self, head_ids, t_full: int, seq_full: Optional[int], x) -> torch.Tensor:
        """The runtime's [s, b] head ids as [s * b] on ``x``'s device, after checking them
        against this layer's input ([s, b, h], or its sequence shard under SP)."""
        if head_ids.numel() != t_full:
            raise ValueError(f"{self.lora_name}: head ids cover {head_ids.numel()} tokens but this "
                             f"layer sees {t_full} (sequence x batch); set_head_ids expects "
                             "[batch, seq] for the same batch as the model input")
        if seq_full is not None and tuple(head_ids.shape) != (seq_full, x.shape[1]):
            # same count, other order: [s, b] given for [b, s] would route token (i, j) by the
            # id of another token, silently
            batch, seq = x.shape[1], seq_full
            raise ValueError(f"{self.lora_name}: head ids were given as {list(head_ids.t().shape)} "
                             f"but this forward has batch={batch}, seq={seq}: set_head_ids expects "
                             f"[batch, seq] = [{batch}, {seq}] like the token ids (transpose "
                             "[seq, batch] ids with .t())")
        return self._lora_runtime.head_ids_on(head_ids, x.device).reshape(-1)

    def _dropout_spec(self, count: int, tok_off: int, feat_off: int) -> Optional[DropoutSpec]:
        probs = self.lora_settings.dropout
        if not self.training or not any(p > 0 for p in probs):
            return None
        seed = layer_dropout_seed(self._lora_runtime.seed, self._lora_name_hash, count)
        return DropoutSpec(probs=probs, seed=seed, token_offset=tok_off, feature_offset=feat_off)

    # ------------------------------------------------------------------ merge
    def _merge_dtype(self) -> torch.dtype:
        # at least fp32 (bf16 deltas would round away), fp64 for fp64 models
        return torch.promote_types(torch.promote_types(self.weight.dtype, self.lora_A.dtype),
                                   torch.float32)

    def lora_delta_weight(self, head: int = 0) -> torch.Tensor:
        """scale * B[head] @ A for this rank's shard, shaped like the local base weight.

        Local in both layouts: column (out/TP, r) @ (r, in); row (out, r) @ (r, in/TP).
        """
        dtype = self._merge_dtype()
        a = self.lora_A.to(dtype)
        if self.lora_rank_mask is not None:
            a = a * self.lora_rank_mask.to(device=a.device, dtype=dtype)[:, None]
        return self.lora_settings.scale * (self.lora_B[head].to(dtype) @ a)

    @torch.no_grad()
    def lora_merge(self, head: Optional[int] = None) -> None:
        """Fold one B head into the base weight (no communication)."""
        s = self.lora_settings
        if s.routing == "router":
            raise ValueError(f"{self.lora_name}: router-routed heads mix per token and cannot be "
                             "merged into one weight")
        if head is None:
            if s.num_heads != 1:
                raise ValueError(f"{self.lora_name}: {s.num_heads} B heads; pass head=k to choose "
                                 "which one to merge (it then applies to every token)")
            head = 0
        if not 0 <= head < s.num_heads:
            raise ValueError(f"{self.lora_name}: head {head} out of range [0, {s.num_heads})")
        if self.lora_merged_head is not None:
            raise RuntimeError(f"{self.lora_name}: already merged (head {self.lora_merged_head})")
        w = self.weight
        w.copy_((w.to(self._merge_dtype()) + self.lora_delta_weight(head)).to(w.dtype))
        self.lora_merged_head = head

    @torch.no_grad()
    def lora_unmerge(self) -> None:
        """Subtract the merged head again (exact up to one rounding of the base dtype)."""
        if self.lora_merged_head is None:
            return
        w = self.weight
        delta = self.lora_delta_weight(self.lora_merged_head)
        w.copy_((w.to(self._merge_dtype()) - delta).to(w.dtype))
        self.lora_merged_head = None

    # ------------------------------------------------------------------ checkpoint
    def lora_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The adapter parameters of this layer by factor name."""
        names = ("lora_A", "lora_B", "lora_router")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's sharded state plus the adapter factors with their own TP split."""
        from megalora.dist_checkpoint import adapter_sharded_state_dict

        base = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return adapter_sharded_state_dict(self, base, prefix, sharded_offsets, metadata)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if not self._lora_ready:
            return base + " [LoRA: not initialised]"
        s = self.lora_settings
        return (f"{base} [LoRA {self.lora_base_split.kind}: r={s.rank}, scale={s.scale:g}, "
                f"heads={s.num_heads}, routing={s.routing}]")


def lora_class_for(base_cls: type) -> type:
    """``LoRA<base_cls>``: the class an adapted layer is swapped to (cached)."""
    if issubclass(base_cls, LoRAMixin):
        return base_cls
    if base_cls not in _CLASS_CACHE:
        cls = type(f"LoRA{base_cls.__name__}", (LoRAMixin, base_cls), {"__module__": __name__})
        _CLASS_CACHE[base_cls] = cls
    return _CLASS_CACHE[base_cls]


def base_class_of(module: torch.nn.Module) -> type:
    """The original class of an adapted layer."""
    for cls in type(module).__mro__[1:]:
        if not issubclass(cls, LoRAMixin):
            return cls
    raise TypeError(f"{type(module).__name__} is not an adapted layer")
