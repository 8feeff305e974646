"""Pareto LoRA: per-objective LoRA gradients (text CE, image regression, ...) combined
Pareto-optimally per parameter group. ``solver`` holds the weight rules on K x K Gram matrices,
``groups`` the parameter grouping and the distributed Gram matrix."""
