"""Triton kernels of megalora, installed as ``megalora.triton_kernels``.

Launchers only: no autograd, no Megatron, no torch.distributed. The autograd Functions and the
backend choice live in ``megalora.ops``. (Kernels arrive with the fused-kernel issue.)
"""
