"""Unified multimodal model (Emu2-style) on megatron-core: model, data, trainer, interop."""
