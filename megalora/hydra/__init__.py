"""HyDRA: hierarchical, dynamic LoRA ranks under a fixed parameter budget."""
