"""megalora: multimodal LoRA for Megatron-core (TP/SP/PP parallel adapters, fused kernels).

Install for development:  pip install --no-build-isolation -e .
``triton_kernels/`` installs as ``megalora.triton_kernels`` (the bare name belongs to Triton).
"""

from setuptools import find_packages, setup

setup(
    name="megalora",
    version="0.1.0",
    description="Multimodal LoRA fine-tuning for Megatron-core at cluster scale",
    python_requires=">=3.10",
    packages=find_packages(include=["megalora", "megalora.*"]) + ["megalora.triton_kernels"],
    package_dir={"megalora.triton_kernels": "triton_kernels"},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "safetensors>=0.4",
        "numpy",
        "pyyaml>=6",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # CUDA builds of torch already depend on a matching triton; CPU-only installs that want
        # the kernel tests (TRITON_INTERPRET=1) add it explicitly.
        "triton": ["triton>=3.2"],
    },
)
