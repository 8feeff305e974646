"""What only the tests use: spawned gloo worlds (``dist``), a local SLURM cluster
(``slurm_local``) and tiny megatron-core GPT models (``tiny_gpt``). Product code never imports
this package (``tests/test_structure.py`` checks); the CPU harness (``megalora.cpu``) and the
layout-independent base init (``megalora.base_init``) are product modules."""
