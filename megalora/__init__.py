"""megalora: multimodal LoRA for Megatron-core at cluster scale.

Public API (imported lazily, so ``import megalora`` stays cheap and has no side effects):

    from megalora import LoRAConfig, apply_lora, set_head_ids, save_adapter, load_adapter
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LoRAConfig": "megalora.config",
    "apply_lora": "megalora.inject",
    "lora_layer_spec": "megalora.inject",
    "merge_lora": "megalora.inject",
    "unmerge_lora": "megalora.inject",
    "remove_lora": "megalora.inject",
    "disable_lora": "megalora.inject",
    "lora_modules": "megalora.inject",
    "LoRAReport": "megalora.inject",
    "set_head_ids": "megalora.runtime",
    "save_adapter": "megalora.adapter_file",
    "load_adapter": "megalora.adapter_file",
    "read_manifest": "megalora.adapter_file",
    "adapter_config": "megalora.adapter_file",
    "adapter_state": "megalora.adapter_file",
    "lora_parameters": "megalora.grads",
    "finalize_lora_grads": "megalora.grads",
    "grad_of": "megalora.grads",
    "register_base_layer": "megalora.base_layers",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megalora' has no attribute {name!r}")
