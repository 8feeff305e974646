"""LoRAConfig validation, pattern matching and per-module resolution."""

import math

import pytest

from megalora.config import LoRAConfig, pattern_matches


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(alpha=0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(routing="moe"), "routing"),
    (dict(num_heads=2), "routing='single' needs num_heads=1"),
    (dict(routing="router", num_heads=1), "routing='router' needs num_heads >= 2"),
    (dict(routing="router", num_heads=2, router_top_k=3), "router_top_k"),
    (dict(routing="modality", num_heads=2, router_top_k=1), "router_top_k"),
    (dict(routing="modality", num_heads=2, dropout=(0.1,)), "per-head values"),
    (dict(routing="router", num_heads=2, dropout=(0.1, 0.2)), "per-head tuple needs"),
    (dict(init_a="xavier"), "init_a"),
    (dict(init_b="ones"), "init_b"),
    (dict(dtype="float8"), "dtype"),
    (dict(backend="cuda"), "backend"),
    (dict(target_modules=()), "target_modules"),
    (dict(target_modules=("",)), "target_modules"),
    (dict(rank_pattern={"linear_qkv": 0}), "rank_pattern"),
    (dict(alpha_pattern={"linear_qkv": -1.0}), "alpha_pattern"),
    (dict(seed="x"), "seed"),
], ids=lambda v: str(v)[:40])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        LoRAConfig(**kwargs)


def test_pattern_matching():
    path = "decoder.layers.12.self_attention.linear_qkv"
    assert pattern_matches("linear_qkv", path)
    assert not pattern_matches("linear_proj", path)
    assert not pattern_matches("qkv", path)  # bare names match the whole last component
    assert pattern_matches("decoder.layers.1?.*", path)
    assert pattern_matches("*.self_attention.*", path)
    assert not pattern_matches("decoder.layers.1.*", path)


def test_settings_first_matching_pattern_wins_and_rslora():
    cfg = LoRAConfig(rank=8, alpha=16, rank_pattern={"decoder.layers.0.*": 4, "linear_fc1": 32},
                     alpha_pattern={"linear_fc1": 64})
    a = cfg.settings_for("decoder.layers.0.mlp.linear_fc1")
    assert (a.rank, a.alpha, a.scale) == (4, 64.0, 16.0)
    b = cfg.settings_for("decoder.layers.1.mlp.linear_fc1")
    assert (b.rank, b.scale) == (32, 2.0)
    c = cfg.settings_for("decoder.layers.1.mlp.linear_fc2")
    assert (c.rank, c.scale) == (8, 2.0)
    rs = LoRAConfig(rank=16, alpha=8, use_rslora=True).settings_for("x.linear_qkv")
    assert math.isclose(rs.scale, 8 / 4)


def test_selects_with_excludes_and_dropout_tuple():
    cfg = LoRAConfig(target_modules=("linear_qkv", "decoder.layers.1.mlp.*"),
                     exclude_modules=("decoder.layers.1.mlp.linear_fc2",),
                     routing="modality", num_heads=2, dropout=[0.1, 0.0])
    assert cfg.selects("decoder.layers.0.self_attention.linear_qkv")
    assert cfg.selects("decoder.layers.1.mlp.linear_fc1")
    assert not cfg.selects("decoder.layers.1.mlp.linear_fc2")
    assert not cfg.selects("decoder.layers.0.mlp.linear_fc1")
    assert cfg.settings_for("a.linear_qkv").dropout == (0.1, 0.0)


def test_dict_round_trip_and_unknown_keys():
    cfg = LoRAConfig(rank=4, routing="router", num_heads=3, router_top_k=2,
                     rank_pattern={"linear_qkv": 8})
    again = LoRAConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['rnak'\]"):
        LoRAConfig.from_dict({"rnak": 4})


def test_unused_patterns_reports_typos():
    cfg = LoRAConfig(target_modules=("linear_qkv", "linear_qvk"), rank_pattern={"layers.9*": 2})
    unused = cfg.unused_patterns(["decoder.layers.0.self_attention.linear_qkv"])
    assert unused == {"target_modules": ["linear_qvk"], "rank_pattern": ["layers.9*"]}
