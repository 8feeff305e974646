"""megalora._C gram/combine against a float64 PyTorch reference; the fallback agrees; bad inputs
raise clear errors from the C++ checks."""

import logging
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from megalora import extension, reductions
from megalora.reference import combine_ref, gram_ref

ext = extension.load()
needs_ext = pytest.mark.skipif(ext is None, reason=f"megalora._C not built: "
                               f"{extension.unavailable_reason()}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(K, P, seed=0, max_numel=3000, mixed=True, special=True):
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for p in range(P):
        n = int(torch.randint(0, max_numel, (1,), generator=g))
        shapes.append((n,) if p % 3 else (max(1, n // 7), 7))
    if special and P >= 3:
        shapes[0], shapes[1] = (0,), (1,)  # an empty tensor, a one-element tensor
    dtypes = [DTYPES[p % 3] if mixed else torch.float32 for p in range(P)]
    return [[torch.randn(*s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]
            for _ in range(K)]


def check_gram(got, ref, what):
    n = ref.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    bound = 1e-5 * n.unsqueeze(-1) * n.unsqueeze(-2) + 1e-6
    assert ((got.double() - ref).abs() <= bound).all(), \
        f"{what}: max err {(got.double() - ref).abs().max().item():.3e}"


GROUPINGS = {
    "one-group": lambda P, g: [0] * P,
    "per-tensor": lambda P, g: list(range(P)),
    "random-with-empty": lambda P, g: [int(x) * 2 for x in torch.randint(0, 4, (P,), generator=g)],
}


@needs_ext
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_gram_matches_float64_reference(K, grouping):
    grads = make(K, 23, seed=K)
    groups = GROUPINGS[grouping](23, torch.Generator().manual_seed(1))
    G = max(groups) + 1
    ref = gram_ref(grads, groups, G)
    got = reductions.gram(grads, groups, backend="ext")
    assert got.shape == (G, K, K) and got.dtype == torch.float32
    check_gram(got, ref, "ext")
    check_gram(reductions.gram(grads, groups, backend="torch"), ref, "fallback")


@needs_ext
def test_three_thousand_tensors_and_determinism():
    grads = make(4, 3000, seed=7, max_numel=600)
    groups = [p // 100 for p in range(3000)]
    ref = gram_ref(grads, groups, 30)
    first = reductions.gram(grads, groups, backend="ext")
    check_gram(first, ref, "3000 tensors")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = reductions.gram(grads, groups, backend="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, reductions.gram(grads, groups, backend="ext"))
    assert torch.equal(first, single)  # the same bits whatever the thread count
    check_gram(reductions.gram(grads, groups, backend="torch"), ref, "fallback")


@needs_ext
@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_combine_matches_reference(backend, out_dtype):
    K = 3
    grads = make(K, 17, seed=3)
    groups = [p % 4 for p in range(17)]
    weights = torch.randn(4, K, generator=torch.Generator().manual_seed(0))
    out = None
    if out_dtype is not None:  # e.g. Megatron's main_grad buffers, accumulated into
        out = [torch.randn(t.shape).to(out_dtype) for t in grads[0]]
    start = [o.clone() for o in out] if out is not None else None
    got = reductions.combine(grads, weights, groups, out=out, accumulate=out is not None,
                             backend=backend)
    want = combine_ref(grads, weights, groups, start)
    for p, (a, b) in enumerate(zip(got, want)):
        tol = 1e-5 if a.dtype == torch.float32 else 1e-2
        assert torch.allclose(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()
                                                                       if b.numel() else 0)), p
    if out is not None:
        assert all(a is b for a, b in zip(got, out))  # written in place


@needs_ext
def test_combine_in_place_into_first_list_and_fallback_agree():
    grads = make(2, 9, seed=5, mixed=False)
    w = torch.tensor([0.25, 0.75])
    copy = [[t.clone() for t in lst] for lst in grads]
    fallback = reductions.combine(copy, w, backend="torch")
    reductions.combine(grads, w, out=grads[0], backend="ext")  # aliasing is safe: elementwise
    for a, b in zip(grads[0], fallback):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_norms_and_cosines():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([-4.0, 3.0])
    G = reductions.gram([[a], [b]], backend="torch")
    assert torch.allclose(reductions.norms(G), torch.tensor([[5.0, 5.0]]))
    assert torch.allclose(reductions.cosines(G), torch.eye(2).unsqueeze(0), atol=1e-7)


@needs_ext
@pytest.mark.parametrize("make_bad, message", [
    (lambda: ([[torch.ones(3)], [torch.ones(3), torch.ones(2)]], [0]),
     r"list 1 has 2 tensors but list 0 has 1"),
    (lambda: ([[torch.ones(3)], [torch.ones(4)]], [0]), r"tensor 0 of list 1 has shape \[4\]"),
    (lambda: ([[torch.ones(3)], [torch.ones(3).bfloat16()]], [0]),
     r"tensor 0 has dtype BFloat16 in list 1 but Float in list 0"),
    (lambda: ([[torch.ones(3)], [torch.ones(3, device="meta")]], [0]),
     r"tensor 0 of list 1 is on meta but tensor 0 of list 0 is on cpu"),
    (lambda: ([[torch.ones(3).double()], [torch.ones(3).double()]], [0]),
     r"unsupported|supported are float32, bfloat16 and float16"),
    (lambda: ([[torch.ones(4, 2).t()], [torch.ones(4, 2).t()]], [0]), r"not contiguous"),
    (lambda: ([[torch.ones(3)]] * 9, [0]), r"need 1 to 8 gradient lists"),
    (lambda: ([[torch.ones(3), torch.ones(2)]] * 2, [0]), r"one group index per tensor \(2\)"),
])
def test_bad_inputs_raise_from_cpp(make_bad, message):
    grads, groups = make_bad()
    with pytest.raises(RuntimeError, match=message):
        ext.gram(grads, torch.tensor(groups), 1)


@needs_ext
def test_bad_groups_weights_and_out():
    grads = [[torch.ones(3), torch.ones(2)]] * 2
    with pytest.raises(RuntimeError, match=r"groups\[1\] = 5 is outside \[0, 2\)"):
        ext.gram(grads, torch.tensor([0, 5]), 2)
    with pytest.raises(RuntimeError, match=r"weights must be \[G, K=2\]"):
        ext.combine(grads, torch.ones(3), torch.tensor([0, 0]), [torch.ones(3), torch.ones(2)])
    with pytest.raises(RuntimeError, match=r"out\[1\] has shape \[3\]"):
        ext.combine(grads, torch.ones(1, 2), torch.tensor([0, 0]), [torch.ones(3), torch.ones(3)])


def test_fallback_when_extension_missing(monkeypatch, caplog):
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_tried", True)
    monkeypatch.setattr(extension, "_error", "No module named 'megalora._C'")
    reductions._announced.discard("fallback")
    grads = make(2, 5, seed=1)
    with caplog.at_level(logging.INFO, logger="megalora"):
        got = reductions.gram(grads)
    assert "use the PyTorch fallback" in caplog.text
    check_gram(got, gram_ref(grads, [0] * 5, 1), "fallback")
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
        reductions.gram(grads, backend="ext")


def _torch_include():
    from torch.utils.cpp_extension import include_paths
    return include_paths()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: CUDA compile "
                    "check skipped")
def test_cuda_sources_compile(tmp_path):
    """nvcc compiles the kernels (compile only: no GPU here), and the torch-facing CUDA host code
    passes a syntax check against torch's and CUDA's headers."""
    for arch in ("80", "90"):
        out = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", f"-arch=sm_{arch}",
                              "csrc/reductions_cuda.cu", "-o", str(tmp_path / f"k{arch}.o")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    cuda_inc = os.path.join(os.path.dirname(os.path.dirname(shutil.which("nvcc"))), "include")
    cuda_inc = next((d for d in (cuda_inc, "/usr/local/cuda/include")
                     if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))), None)
    if cuda_inc is None:
        pytest.skip("CUDA runtime headers not found: host-code syntax check skipped")
    # CPU wheels of torch ship c10/cuda headers without the one CMake generates: stub it
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in _torch_include() + [cuda_inc, sysconfig.get_paths()["include"],
                                                       str(tmp_path / "stub")]]
    for src in ("csrc/reductions_cuda_host.cpp", "csrc/bindings.cpp"):
        out = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-DMEGALORA_WITH_CUDA",
                              "-DTORCH_EXTENSION_NAME=_C", *includes, src],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, src + "\n" + out.stderr[-3000:]
