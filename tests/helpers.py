"""Comparison helpers shared by the tests."""

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0,
                 name: str = "") -> None:
    """allclose with a report of where and how much it differs."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs().max().item()
    if diff.numel() and diff.max().item() > bound:
        idx = diff.argmax().item()
        raise AssertionError(f"{name}: max |diff| {diff.max().item():.3e} > {bound:.3e} at flat index "
                             f"{idx} ({actual.reshape(-1)[idx].item()!r} vs "
                             f"{expected.reshape(-1)[idx].item()!r}); "
                             f"{int((diff > bound).sum())} of {diff.numel()} elements differ")


def assert_dicts_close(actual: dict, expected: dict, rtol: float, atol: float = 0.0, what: str = ""):
    assert sorted(actual) == sorted(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))[:5]}"
    for key in expected:
        assert_close(actual[key], expected[key], rtol, atol, name=f"{what} {key}")
