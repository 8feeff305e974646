"""Adapter files: round trips across TP/PP layouts, atomic writes, and clear errors."""

import os

import pytest
import torch

import megalora
from megalora.testing.dist import run_distributed

SHAPE = dict(swiglu=True)  # fc1 B is split [gate_i; up_i] per rank: the strided path
LORA = dict(rank=4, alpha=8.0, num_heads=2, routing="modality", init_b="gaussian")


def _build(tp, pp, seed, **lora):
    from megalora.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt, tiny_gpt_config

    shape = TinyGPTShape(**SHAPE)
    model = build_tiny_gpt(shape, tiny_gpt_config(shape, tp, pp, sp=tp > 1), seed=0)
    megalora.apply_lora(model, megalora.LoRAConfig(seed=seed, **{**LORA, **lora}))
    return model


def _save_then_load(rank, world, tp, pp, save_path, load_path):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = _build(tp, pp, seed=2)
    saved = megalora.adapter_state(model)
    megalora.save_adapter(model, save_path, extra={"step": "3"})
    megalora.load_adapter(model, load_path)
    return {"saved": saved, "loaded": megalora.adapter_state(model)}


def test_round_trip_between_tp2_pp2_and_single_process(megatron_world1, tmp_path):
    single = _build(1, 1, seed=1)
    state1 = megalora.adapter_state(single)
    p_single, p_dist = str(tmp_path / "tp1.safetensors"), str(tmp_path / "tp2pp2.safetensors")
    megalora.save_adapter(single, p_single)

    results = run_distributed(4, _save_then_load, (2, 2, p_dist, p_single))
    saved_dist, loaded_dist = {}, {}
    for r in results:
        saved_dist.update(r["saved"])
        loaded_dist.update(r["loaded"])
    assert sorted(loaded_dist) == sorted(state1)
    for key in state1:  # TP=1 file -> TP=2 x PP=2 model
        assert torch.equal(loaded_dist[key], state1[key]), key
    manifest = megalora.read_manifest(p_dist)
    assert manifest["saved_with"] == {"tp": 2, "pp": 2} and manifest["extra"] == {"step": "3"}
    assert manifest["lora_config"]["rank"] == 4

    megalora.load_adapter(single, p_dist)  # TP=2 x PP=2 file -> TP=1 model
    for key, value in megalora.adapter_state(single).items():
        assert torch.equal(value, saved_dist[key]), key


@pytest.fixture
def saved(megatron_world1, tmp_path):
    model = _build(1, 1, seed=3)
    path = str(tmp_path / "adapter.safetensors")
    megalora.save_adapter(model, path)
    return model, path


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    model, path = saved
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        megalora.load_adapter(model, str(bad))
    bad.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        megalora.load_adapter(model, str(bad))


def test_flipped_bit_fails_the_checksum(saved, tmp_path):
    model, path = saved
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    before = megalora.adapter_state(model)
    with pytest.raises(ValueError, match="checksum mismatch"):
        megalora.load_adapter(model, str(bad))
    del before


def test_wrong_rank_names_module_and_shapes(saved):
    _, path = saved
    other = _build(1, 1, seed=3, rank=8, alpha=16.0)
    with pytest.raises(ValueError, match=r"lora_A has shape \[4, 64\] in the file but \[8, 64\]"):
        megalora.load_adapter(other, path)


def test_missing_foreign_and_extra(saved, tmp_path):
    from safetensors.torch import save_file

    model, path = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        megalora.load_adapter(model, str(tmp_path / "nope.safetensors"))
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a megalora adapter"):
        megalora.load_adapter(model, foreign)
    qkv_only = _build(1, 1, seed=3, target_modules=("linear_qkv",))
    with pytest.raises(ValueError, match="modules this model does not adapt"):
        megalora.load_adapter(qkv_only, path)
    loaded = megalora.load_adapter(qkv_only, path, strict=False)
    assert len(loaded) == 2 * 4 and all("linear_qkv" in k for k in loaded)
    more = _build(1, 1, seed=3, target_modules=("linear_qkv", "linear_fc1", "linear_fc2",
                                                "linear_proj", "output_layer"))
    with pytest.raises(ValueError, match="lacks 2 tensor"):
        megalora.load_adapter(more, path)


def test_write_is_atomic(saved, monkeypatch):
    import safetensors.torch

    model, path = saved
    good = open(path, "rb").read()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        megalora.save_adapter(model, path)
    assert open(path, "rb").read() == good
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")] == []
