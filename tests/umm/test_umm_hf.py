"""Hugging Face interop of the UMM, checked against Hugging Face's own forward passes.

A tiny random ``LlamaForCausalLM`` is imported at TP=2, PP=2 and TP=2+SP with GQA; the UMM's
text logits match HF's. With LoRA applied, the PEFT export loaded by ``peft.PeftModel`` and the
merged export loaded by ``LlamaForCausalLM.from_pretrained`` give the adapted UMM's logits.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import launch_env
from megalora.testing.dist import run_distributed

VOCAB, HIDDEN, FFN = 64, 64, 172


def _model_cfg(layers, kv_heads=None, **extra):
    return {"num_layers": layers, "hidden_size": HIDDEN, "num_attention_heads": 4,
            "num_query_groups": kv_heads, "ffn_hidden_size": FFN, "base_vocab": VOCAB,
            "norm_eps": 1e-6, "rope_base": 10000.0, **extra}


def _run_config(model, parallel=None):
    from megalora.umm.config import RunConfig

    return RunConfig.from_dict({"model": model, "parallel": parallel or {},
                                "train": {"device": "cpu"}})


def _save_llama(path, layers, kv_heads=4, seed=0, tied=False, shard_size=None):
    """A random tiny LLaMA (norm weights too, so a misplaced norm shows) saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, rms_norm_eps=1e-6, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 *
                    torch.randn_like(p))
    if shard_size:
        model.save_pretrained(str(path), max_shard_size=shard_size)
    else:
        model.save_pretrained(str(path))
    return str(path)


def _load_llama(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                            attn_implementation="eager").eval()


def _tokens():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model, tokens):
    """Full-vocab logits [b, s, V_padded] on the last stage (None elsewhere): stages run by
    hand with send/recv, vocab-parallel logits gathered over TP. Causal mask, like the trainer."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megalora.umm.batch import causal_mask

    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    if not model.pre_process:
        x = torch.empty(s // (ps.get_tensor_model_parallel_world_size()
                              if model.config.sequence_parallel else 1), b, HIDDEN)
        dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(x)
    with torch.no_grad():
        out = model.llm(tokens, positions, causal_mask(s), labels=None)
    if not model.post_process:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _roundtrip_worker(rank, world, ckpt, model_cfg, parallel, lora, out):
    import megalora
    from megatron.core import parallel_state as ps

    from megalora.umm.hf import export_merged, export_peft, import_llama
    from megalora.umm.model import build_umm
    from megalora.umm.tokens import TEXT

    run = _run_config(model_cfg, parallel)
    ps.initialize_model_parallel(tensor_model_parallel_size=run.parallel.tensor_parallel,
                                 pipeline_model_parallel_size=run.parallel.pipeline_parallel)
    model = build_umm(run).eval()
    import_llama(model, ckpt)
    tokens = _tokens()
    base = _logits(model, tokens)
    megalora.apply_lora(model, megalora.LoRAConfig(**lora))
    if lora.get("routing") == "modality":  # text tokens route to head 0 (tokens.TEXT)
        megalora.set_head_ids(model, torch.full_like(tokens, TEXT))
    adapted = _logits(model, tokens)
    export_peft(model, os.path.join(out, "peft"), head=0)
    export_merged(model, os.path.join(out, "merged"), head=0)
    megalora.save_adapter(model, os.path.join(out, "adapter.safetensors"))
    return {"base": base, "adapted": adapted}


def _close(got, ref, what):
    tol = 1e-4 * ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


CASES = {
    "tp2": dict(layers=2, kv=None, parallel={"tensor_parallel": 2},
                lora=dict(rank=4, alpha=8.0, init_b="gaussian", rank_pattern={"linear_fc2": 2},
                          alpha_pattern={"linear_proj": 3.0})),
    "pp2-modality": dict(layers=4, kv=None, parallel={"pipeline_parallel": 2},
                         lora=dict(rank=4, alpha=8.0, init_b="gaussian", num_heads=2,
                                   routing="modality",
                                   exclude_modules=("llm.decoder.layers.0.*",))),
    "tp2-sp-gqa": dict(layers=2, kv=2, parallel={"tensor_parallel": 2, "sequence_parallel": True},
                       lora=dict(rank=4, alpha=8.0, init_b="gaussian", use_rslora=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_import_and_exports_match_hf(tmp_path, case):
    from peft import PeftModel

    c = CASES[case]
    ckpt = _save_llama(tmp_path / "llama", c["layers"], kv_heads=c["kv"] or 4)
    model_cfg = _model_cfg(c["layers"], c["kv"])
    results = run_distributed(2, _roundtrip_worker, (ckpt, model_cfg, c["parallel"], c["lora"],
                                                     str(tmp_path)))
    got = next(r for r in results if r["base"] is not None)
    tokens = _tokens()
    hf = _load_llama(ckpt)
    with torch.no_grad():
        ref = hf(tokens).logits
    _close(got["base"][..., :VOCAB], ref, "imported base vs HF")
    assert (got["adapted"] - got["base"]).abs().max() > 0.1 * ref.abs().max()  # LoRA matters

    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert cfg["use_rslora"] == c["lora"].get("use_rslora", False)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()(tokens).logits
    _close(got["adapted"][..., :VOCAB], peft_logits, "adapted UMM vs PEFT")
    merged = _load_llama(tmp_path / "merged")
    with torch.no_grad():
        _close(got["adapted"][..., :VOCAB], merged(tokens).logits, "adapted UMM vs merged")
    if case == "tp2":
        assert cfg["rank_pattern"] and cfg["alpha_pattern"]
        _check_cli(tmp_path, ckpt, model_cfg)
    if case == "pp2-modality":  # layer 0 excluded: an exact-name regex, not leaf names
        assert isinstance(cfg["target_modules"], str) and "layers\\.0\\." not in \
            cfg["target_modules"]


def _check_cli(tmp_path, ckpt, model_cfg):
    """``megalora export-peft`` at TP=1 (no torchrun) writes the same adapter as TP=2 did."""
    import yaml
    from safetensors.torch import load_file

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {**model_cfg, "hf_checkpoint": ckpt},
                                      "train": {"device": "cpu"}}))
    # launch_env: without this worker's MASTER_PORT, where rank 0's store still listens
    # (inheriting it failed in CI with EADDRINUSE)
    env = launch_env()
    proc = subprocess.run([sys.executable, "-m", "megalora", "export-peft", "--config",
                           str(config), "--adapter", str(tmp_path / "adapter.safetensors"),
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- errors (in-process)
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("llama") / "ckpt", 2)


def test_config_mismatch_names_the_field(megatron_world1, llama_dir):
    from megalora.umm.hf import import_llama
    from megalora.umm.model import build_umm

    model = build_umm(_run_config(_model_cfg(2, ffn_hidden_size=128)))
    with pytest.raises(ValueError, match=r"model.ffn_hidden_size=128 but the checkpoint's "
                                         r"intermediate_size=172: set model.ffn_hidden_size: 172"):
        import_llama(model, llama_dir)
    model = build_umm(_run_config(_model_cfg(2, norm_eps=1e-5)))
    with pytest.raises(ValueError, match=r"model.norm_eps=1e-05 .* set model.norm_eps: 1e-06"):
        import_llama(model, llama_dir)


def test_tied_and_sharded_checkpoint_in_process(megatron_world1, tmp_path):
    """TP=PP=1: a checkpoint saved in several safetensors shards (with an index) and with tied
    embeddings imports to HF's logits."""
    from megalora.umm.hf import import_llama
    from megalora.umm.model import build_umm

    ckpt = _save_llama(tmp_path / "tied", 2, tied=True, shard_size="40KB")
    assert os.path.isfile(os.path.join(ckpt, "model.safetensors.index.json"))
    model = build_umm(_run_config(_model_cfg(2))).eval()
    import_llama(model, ckpt)
    tokens = _tokens()
    with torch.no_grad():
        ref = _load_llama(ckpt)(tokens).logits
    _close(_logits(model, tokens)[..., :VOCAB], ref, "tied/sharded import vs HF")
    out = model.llm.output_layer.weight
    assert torch.equal(out[VOCAB:VOCAB + 4], out[:VOCAB].mean(0).expand(4, -1))  # specials
    assert not out[VOCAB + 4:].any()  # padding rows


def test_missing_and_corrupt_checkpoints(megatron_world1, llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from megalora.umm.hf import import_llama
    from megalora.umm.model import build_umm

    model = build_umm(_run_config(_model_cfg(2)))
    state = load_file(os.path.join(llama_dir, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'"):
        import_llama(model, state)
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        import_llama(model, str(broken))


def test_router_adapter_cannot_be_exported(megatron_world1, tmp_path):
    import megalora
    from megalora.umm.hf import export_peft
    from megalora.umm.model import build_umm

    model = build_umm(_run_config(_model_cfg(2)))
    megalora.apply_lora(model, megalora.LoRAConfig(num_heads=2, routing="router"))
    with pytest.raises(ValueError, match=r"routing='router'.*cannot be exported"):
        export_peft(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_vision_adapters_are_skipped_with_a_warning(megatron_world1, tmp_path, caplog):
    import megalora
    from megalora.umm.config import RunConfig
    from megalora.umm.hf import export_peft
    from megalora.umm.model import build_umm

    run = RunConfig.from_dict({"model": _model_cfg(2), "vision": {"enabled": True},
                               "train": {"device": "cpu"}})
    model = build_umm(run)
    megalora.apply_lora(model, megalora.LoRAConfig(init_b="gaussian"))
    with caplog.at_level("WARNING", logger="megalora"):
        cfg = export_peft(model, str(tmp_path / "peft"))
    assert "vision.decoder.layers.0.self_attention.linear_qkv" in caplog.text
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                     "up_proj", "v_proj"]
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(keys) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.layers.")
                                          for k in keys)



def test_trainer_builds_from_hf_checkpoint(megatron_world1, llama_dir, tmp_path):
    """``model.hf_checkpoint`` in a run config: the trainer's model (adapters added, B = 0)
    reproduces HF's logits on a text-only batch."""
    from megalora.umm.config import RunConfig
    from megalora.umm.session import build_model

    run = RunConfig.from_dict({"model": _model_cfg(2, hf_checkpoint=llama_dir),
                               "train": {"device": "cpu", "out_dir": str(tmp_path)}})
    model, _ = build_model(run, torch.device("cpu"))
    tokens = _tokens()
    import megalora
    megalora.set_head_ids(model, torch.zeros_like(tokens))
    with torch.no_grad():
        got = _logits(model, tokens)[..., :VOCAB]
        ref = _load_llama(llama_dir)(tokens).logits
    _close(got, ref, "trainer-built model")


@pytest.mark.slow
def test_export_refuses_a_config_that_contradicts_the_adapter(megatron_world1, tmp_path):
    """The adapter's stored config decides the export; a run config that sets another alpha
    is refused with the field named, not exported at the wrong scale."""
    import yaml

    import megalora
    from megalora.umm.model import build_umm

    model = build_umm(_run_config(_model_cfg(2)))
    megalora.apply_lora(model, megalora.LoRAConfig(rank=4, alpha=8.0, init_b="gaussian"))
    adapter = str(tmp_path / "adapter.safetensors")
    megalora.save_adapter(model, adapter)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": _model_cfg(2), "train": {"device": "cpu"},
                                      "lora": {"rank": 4, "alpha": 32.0}}))
    # launch_env: without this worker's MASTER_PORT, where rank 0's store still listens
    # (inheriting it failed in CI with EADDRINUSE)
    env = launch_env()
    proc = subprocess.run([sys.executable, "-m", "megalora", "export-peft", "--config",
                           str(config), "--adapter", adapter, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "lora.alpha: 8.0 vs 32.0" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
