"""megalora._C's CUDA gram/combine on CUDA tensors against the float64 reference
(``make gpu-check``): fp32, bf16 and fp16 gradients of odd sizes (empty, one element, 2-D), K up
to 8, groups with gaps; the 2x rule against the same-precision ``torch._foreach`` fallback on
the same GPU; bitwise-repeatable results. Skipped without a GPU (CI has none)."""

import pytest
import torch

from megalora import extension, reductions
from megalora.reference import combine_ref, gram_ref

ext = extension.load()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (make gpu-check runs it)"),
    pytest.mark.skipif(ext is None or not ext.has_cuda(),
                       reason="megalora._C is not built with CUDA (MEGALORA_FORCE_CUDA=1)")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _grads(K, P, dtype=None, seed=0, max_numel=5000):
    """K lists of P CUDA gradients: odd sizes, an empty and a one-element tensor, mixed
    dtypes unless ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(0, max_numel, (1,), generator=g)),) for _ in range(P)]
    shapes[0], shapes[1], shapes[2] = (0,), (1,), (37, 11)
    dtypes = [dtype or DTYPES[p % 3] for p in range(P)]
    return [[torch.randn(*s, generator=g).to(dt).cuda() for s, dt in zip(shapes, dtypes)]
            for _ in range(K)]


def _err(got, ref):
    return (got.double().cpu() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES + [None], ids=lambda d: str(d or "mixed"))
@pytest.mark.parametrize("K", [2, 3, 8])
def test_gram_on_cuda(K, dtype):
    grads = _grads(K, 41, dtype, seed=K)
    groups = [(p % 5) * 2 for p in range(41)]  # groups 1, 3, ... stay empty
    ref = gram_ref(grads, groups, 10)
    got = reductions.gram(grads, groups, 10, backend="ext")
    fallback = reductions.gram(grads, groups, 10, backend="torch")
    assert got.is_cuda and got.shape == (10, K, K) and got.dtype == torch.float32
    scale = ref.abs().max().item()
    assert _err(got, ref) <= 2 * _err(fallback, ref) + 1e-6 * scale, \
        (_err(got, ref), _err(fallback, ref))
    assert torch.equal(got, reductions.gram(grads, groups, 10, backend="ext"))  # repeatable


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 4])
def test_combine_on_cuda(K, out_dtype):
    grads = _grads(K, 29, seed=10 + K)
    groups = [p % 3 for p in range(29)]
    weights = torch.randn(3, K, generator=torch.Generator().manual_seed(K))

    def out():
        if out_dtype is None:
            return None
        g = torch.Generator().manual_seed(5)
        return [torch.randn(t.shape, generator=g).to(out_dtype).cuda() for t in grads[0]]

    start = out()
    want = combine_ref(grads, weights, groups, start)
    got = reductions.combine(grads, weights, groups, out=out(), accumulate=start is not None,
                             backend="ext")
    fallback = reductions.combine(grads, weights, groups, out=out(),
                                  accumulate=start is not None, backend="torch")
    for p, ref in enumerate(want):
        if not ref.numel():
            continue
        assert got[p].is_cuda
        err, budget = _err(got[p], ref), _err(fallback[p], ref)
        assert err <= 2 * budget + 1e-6 * ref.abs().max().item(), (p, err, budget)
