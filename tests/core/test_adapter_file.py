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


@pytest.mark.slow
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


# ---------------------------------------------------------------------- refusals (issue 15)
def _file_crc(t):  # independent of megalora's: CRC32 of the raw bytes
    import zlib

    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _rewrite(src, dst, edit, fix_crc=True):
    """Copy adapter ``src`` to ``dst`` with ``edit(tensors)`` applied, checksums recomputed
    (``fix_crc``) or left as they were (a corrupted tensor)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    manifest = json.loads(meta["manifest"])
    edit(tensors)
    if fix_crc:
        for key, value in tensors.items():
            manifest["tensors"][key]["crc32"] = _file_crc(value)
    save_file(tensors, str(dst), metadata={**meta, "manifest": json.dumps(manifest)})
    return str(dst)


def _assert_same(state, model):
    after = megalora.adapter_state(model)
    assert sorted(after) == sorted(state)
    for key in state:
        assert torch.equal(after[key], state[key]), key


def test_scale_mismatch_is_refused_unless_asked(saved):
    _, path = saved  # alpha=8, rank=4: scale 2
    other = _build(1, 1, seed=5, alpha=16.0)
    before = megalora.adapter_state(other)
    with pytest.raises(ValueError, match=r"another LoRA scale.*file alpha=8.0, scale=2; model "
                                         r"alpha=16.0, scale=4.*allow_scale_mismatch=True"):
        megalora.load_adapter(other, path)
    _assert_same(before, other)
    megalora.load_adapter(other, path, allow_scale_mismatch=True)
    from safetensors.torch import load_file
    _assert_same(load_file(path), other)


def test_config_is_stored_when_saved_through_megatron_ddp(megatron_world1, tmp_path):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megalora.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt, tiny_gpt_config

    shape = TinyGPTShape(**SHAPE)
    cfg = tiny_gpt_config(shape)
    model = build_tiny_gpt(shape, cfg, seed=0)
    config = megalora.LoRAConfig(seed=2, **LORA)
    megalora.apply_lora(model, config)
    ddp = DistributedDataParallel(config=cfg, module=model,
                                  ddp_config=DistributedDataParallelConfig())
    path = str(tmp_path / "adapter.safetensors")
    megalora.save_adapter(ddp, path)  # what the trainer does
    assert megalora.read_manifest(path)["lora_config"] == config.to_dict()
    from megalora.adapter_file import adapter_config
    assert adapter_config(path) == config


def test_non_finite_adapter_is_never_saved(saved):
    model, path = saved
    good = open(path, "rb").read()
    layer = megalora.lora_modules(model)[1]
    with torch.no_grad():
        layer.lora_B[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"{layer.lora_name}.lora_B holds non-finite"):
        megalora.save_adapter(model, path)
    assert open(path, "rb").read() == good


def test_non_finite_file_is_refused(saved, tmp_path):
    model, path = saved
    first = next(iter(megalora.adapter_state(model)))

    def poison(tensors):
        tensors[first][0, 0] = float("inf")

    bad = _rewrite(path, tmp_path / "inf.safetensors", poison)  # checksums fixed up
    other = _build(1, 1, seed=5)
    before = megalora.adapter_state(other)
    with pytest.raises(FloatingPointError, match=rf"{first} holds non-finite values"):
        megalora.load_adapter(other, bad)
    _assert_same(before, other)


def test_failed_checksum_leaves_every_tensor_unchanged(saved, tmp_path):
    model, path = saved
    last = list(megalora.adapter_state(model))[-1]  # loaded last

    def flip(tensors):
        tensors[last].view(-1)[-1] += 1.0

    bad = _rewrite(path, tmp_path / "flipped.safetensors", flip, fix_crc=False)
    other = _build(1, 1, seed=5)  # other values than the file's
    before = megalora.adapter_state(other)
    with pytest.raises(ValueError, match=rf"checksum mismatch for {last}"):
        megalora.load_adapter(other, bad)
    _assert_same(before, other)


def test_merged_model_refuses_a_load(saved):
    model, path = saved
    other = _build(1, 1, seed=5)
    base = {n: p.detach().clone() for n, p in other.named_parameters() if not p.requires_grad}
    megalora.merge_lora(other, head=0)
    merged = {n: p.detach().clone() for n, p in other.named_parameters() if not p.requires_grad}
    with pytest.raises(ValueError, match="merged into its base weight; call "
                                         r"megalora.unmerge_lora\(model\) before loading"):
        megalora.load_adapter(other, path)
    for name, value in merged.items():
        assert torch.equal(dict(other.named_parameters())[name], value), name
    megalora.unmerge_lora(other)
    for name, value in base.items():
        assert torch.allclose(dict(other.named_parameters())[name], value, atol=1e-7), name


def test_broken_manifest_names_the_file(saved, tmp_path):
    import json

    from safetensors.torch import save_file

    _, path = saved
    for i, manifest in enumerate(["{not json", json.dumps({"version": 1}),
                                  json.dumps({"version": 1, "modules": {},
                                              "tensors": {"x.lora_A": {"shape": [1]}}})]):
        bad = str(tmp_path / f"broken{i}.safetensors")
        save_file({"x.lora_A": torch.zeros(1)}, bad,
                  metadata={"format": "megalora-adapter", "manifest": manifest})
        with pytest.raises(ValueError, match=rf"adapter file '{bad}' has a"):
            megalora.read_manifest(bad)
