"""Parameter groups for Pareto LoRA and the distributed K x K Gram matrix per group.

A grouping is named by a string; every rank derives the same list of groups from it and the
number of decoder layers, whatever parameters it holds (a group a rank does not hold
contributes zeros):

- ``model``: one group.
- ``layer``: one group per decoder layer, plus ``vision`` (an in-loop encoder) and ``other``
  (adapters outside the decoder layers, e.g. on the output layer).
- ``layer_group:N``: N groups of consecutive decoder layers (early ... late), plus the two.
- ``module``: one group per adapted module kind (``linear_qkv``, ``linear_proj``,
  ``linear_fc1``, ``linear_fc2``) over all layers, plus the two.

The Gram matrix of group g is G[g, i, j] = <grad_i, grad_j> over its parameters, summed over TP
(sharded factors hold different slices; replicated ones are counted on TP rank 0 only) and PP
(a group spanning stages sums over them) by one all-reduce of the [groups, K, K] tensor over
the model-parallel group. Take it after the data-parallel reduction: the gradients are then
identical on every data-parallel rank, and so are the weights computed from them.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megalora import reductions

KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")


def _parse(spec: str, num_layers: int):
    if spec in ("model", "layer", "module"):
        return spec, None
    if spec.startswith("layer_group:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if not 1 <= n <= num_layers:
            raise ValueError(f"pareto.groups={spec!r}: N must be an int in [1, num_layers="
                             f"{num_layers}]")
        return "layer_group", n
    raise ValueError(f"pareto.groups={spec!r}: use model, layer, layer_group:N or module")


def group_names(spec: str, num_layers: int) -> List[str]:
    """The groups of ``spec`` (the same list on every rank)."""
    kind, n = _parse(spec, num_layers)
    if kind == "model":
        return ["model"]
    if kind == "layer":
        names = [f"layer{i}" for i in range(num_layers)]
    elif kind == "layer_group":
        names = []
        for g in range(n):
            first, last = g * num_layers // n, (g + 1) * num_layers // n - 1
            names.append(f"layers{first}-{last}")
    else:
        names = list(KINDS)
    return names + ["vision", "other"]


def group_of(name: str, spec: str, num_layers: int) -> int:
    """Index in ``group_names(spec, num_layers)`` of the adapter parameter with canonical
    ``name`` (e.g. ``llm.decoder.layers.3.mlp.linear_fc1.lora_A``)."""
    kind, n = _parse(spec, num_layers)
    if kind == "model":
        return 0
    size = num_layers if kind == "layer" else (n if kind == "layer_group" else len(KINDS))
    if name.startswith("vision."):
        return size
    if kind == "module":
        module = name.rsplit(".", 2)[-2]
        return KINDS.index(module) if module in KINDS else size + 1
    match = _LAYER.search(name)
    if match is None:
        return size + 1
    layer = int(match.group(1))
    if not 0 <= layer < num_layers:
        raise ValueError(f"{name}: layer {layer} is outside the model's {num_layers} layers")
    return layer if kind == "layer" else layer * n // num_layers


def distributed_gram(grads: Sequence[Sequence[torch.Tensor]], counted: Sequence[bool],
                     group_ids: Sequence[int], num_groups: int,
                     mp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """[num_groups, K, K] float64 Gram matrices of the K gradient lists over the whole model.

    ``counted[p]``: whether this rank adds parameter p: sharded factors count on every TP rank
    (each holds a slice), replicated ones on TP rank 0 only. One all-reduce (SUM) over
    ``mp_group`` (TP x PP)."""
    keep = [i for i, c in enumerate(counted) if c]
    lists = [[g[i] for i in keep] for g in grads]
    ids = [group_ids[i] for i in keep]
    if lists and lists[0]:
        local = reductions.gram(lists, ids, num_groups).to(torch.float64)
    else:
        local = torch.zeros(num_groups, len(grads), len(grads), dtype=torch.float64)
    if mp_group is not None and dist.is_initialized() and dist.get_world_size(mp_group) > 1:
        device = grads[0][0].device if grads and grads[0] else torch.device("cpu")
        local = local.to(device)
        dist.all_reduce(local, group=mp_group)
    return local.cpu()
