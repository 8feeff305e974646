"""megalora: multimodal LoRA for Megatron-core (TP/SP/PP parallel adapters, fused kernels).

Install for development:  pip install --no-build-isolation -e .
(no build isolation: the C++ extension compiles against the torch already installed)

``triton_kernels/`` installs as ``megalora.triton_kernels`` (the bare name belongs to Triton).

Build switches (environment variables):
  MEGALORA_SKIP_EXT=1     do not build megalora._C (the pure-PyTorch fallback is used instead)
  MEGALORA_FORCE_CUDA=1   build the CUDA kernels even where no GPU is visible (needs a CUDA
                          build of torch and the CUDA toolkit, CUDA_HOME)
  MEGALORA_NO_CUDA=1      build the CPU extension only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0": A100, H100/H200)
  MAX_JOBS                parallel compile jobs (torch's BuildExtension honours it)
"""

import os

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    """(ext_modules, cmdclass): megalora._C from csrc/, CPU always, CUDA when possible."""
    if _flag("MEGALORA_SKIP_EXT"):
        print("megalora: MEGALORA_SKIP_EXT=1, not building megalora._C (fallback in use)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("megalora: torch is not importable at build time, so megalora._C is not built; "
              "install torch first and use `pip install --no-build-isolation -e .`")
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    sources = ["csrc/bindings.cpp", "csrc/reductions_cpu.cpp"]
    want_cuda = _flag("MEGALORA_FORCE_CUDA") or (torch.cuda.is_available() and
                                                  not _flag("MEGALORA_NO_CUDA"))
    if want_cuda and (torch.version.cuda is None or CUDA_HOME is None):
        raise RuntimeError("megalora: CUDA build requested but torch is a CPU build or CUDA_HOME "
                           "is unset; unset MEGALORA_FORCE_CUDA or install the CUDA toolkit")
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "megalora._C", sources + ["csrc/reductions_cuda.cu", "csrc/reductions_cuda_host.cpp"],
            define_macros=[("MEGALORA_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("megalora._C", sources, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="megalora",
    version="0.1.0",
    description="Multimodal LoRA fine-tuning for Megatron-core at cluster scale",
    python_requires=">=3.10",
    packages=find_packages(include=["megalora", "megalora.*"]) + ["megalora.triton_kernels"],
    package_dir={"megalora.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # `megalora train|plan|layout|rank-search|export-peft|export-merged|pareto-plot`
    entry_points={"console_scripts": ["megalora=megalora.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "safetensors>=0.4",
        "numpy",
        "pyyaml>=6",
        "tqdm>=4.60",
        # SLURM's compressed node lists (gpu[01-04,07]); `scontrol show hostnames` without it
        "python-hostlist>=1.21",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # CUDA builds of torch already depend on a matching triton; CPU-only installs that want
        # the kernel tests (TRITON_INTERPRET=1) add it explicitly.
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.45", "peft>=0.13"],
        "tensorboard": ["tensorboard>=2.10"],
        # launch/mpirun.sh: the rendezvous broadcast (use your cluster's MPI, or pip's mpich)
        "mpi": ["mpi4py>=3.1"],
        # MARS (megalora rank-search): law fitting and plots
        "mars": ["scipy>=1.10", "matplotlib>=3.7"],
        # HyDRA (hydra.enabled): the performance model and the allocation heatmap
        "hydra": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        # documents with image files (the converter), EmojiCap and its judge
        "images": ["pillow>=9", "scipy>=1.10"],
    },
)
