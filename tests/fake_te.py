"""A stand-in that follows Transformer Engine's LayerNormLinear contract as Megatron wraps it.

TE cannot be installed on CPU CI machines, so the TE code path (read the post-norm activation
through ``return_layernorm_output``, unpack TE's return tuples, keep the LN output local under
sequence parallelism) is checked against this double; ``test_te_layers.py`` also has a test that
runs the real TE classes when they are importable.

Contract mirrored (TE ``LayerNormLinear.forward`` + megatron ``TELayerNormColumnParallelLinear``):
- attributes ``in_features``/``out_features`` (global), ``parallel_mode="column"``,
  ``sequence_parallel``, ``_tp_group``, ``return_layernorm_output(_gathered)``, ``te_return_bias``;
- returns ``(out, bias, ln_out)`` when ``te_return_bias`` and ``return_layernorm_output``,
  ``(out, bias)`` when only ``te_return_bias``, else ``((out, ln_out), None)`` / ``(out, None)``;
- under SP the input is a sequence shard; the LN output returned is that local shard.
"""

import torch
import torch.nn.functional as F

from megalora import comm


class FakeTELayerNormColumnParallelLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, tp_group, sequence_parallel, *,
                 skip_bias_add=False, return_layernorm_output=False, dtype=torch.float64):
        super().__init__()
        tp = comm.group_size(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self._tp_group, self.parallel_mode = tp_group, "column"
        self.sequence_parallel = sequence_parallel and tp > 1
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(in_features, dtype=dtype))
        self.layer_norm_bias = torch.nn.Parameter(torch.zeros(in_features, dtype=dtype))
        self.weight = torch.nn.Parameter(torch.zeros(out_features // tp, in_features,
                                                     dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features // tp, dtype=dtype))
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = False
        self.te_return_bias = skip_bias_add

    def forward(self, x):
        ln = F.layer_norm(x, (self.in_features,), self.layer_norm_weight, self.layer_norm_bias)
        full = comm.gather_seq(ln, self._tp_group) if self.sequence_parallel else \
            comm.copy_to_tp(ln, self._tp_group)
        out = full @ self.weight.t()
        if self.te_return_bias:
            return (out, self.bias, ln) if self.return_layernorm_output else (out, self.bias)
        out = out + self.bias
        return ((out, ln) if self.return_layernorm_output else out), None


class FakeTELinearDuplicated(torch.nn.Module):
    """TE ``Linear`` with ``parallel_mode="duplicated"`` as Megatron's TELinear wraps it: the
    weight is whole on every TP rank; under SP the input (and output) is a sequence shard."""

    def __init__(self, in_features, out_features, tp_group, sequence_parallel,
                 dtype=torch.float64):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._tp_group, self.parallel_mode = tp_group, "duplicated"
        self.sequence_parallel = sequence_parallel and comm.group_size(tp_group) > 1
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))

    def forward(self, x):
        return x @ self.weight.t(), None
