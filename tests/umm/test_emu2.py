"""Emu2 checkpoints in and out, against a tiny Emu2 written for the tests (emu2_reference).

The tiny Emu2 has Emu2's exact tensor names and structure (EVA with q_bias/v_bias and
post-norm, decoder.lm = transformers' LlamaForCausalLM with the resized vocabulary, both
connectors). Saved as Emu2's native .bin, the Hugging Face sharded layout and Emu2-Gen's
prefixed safetensors, it is imported at TP=2, PP=2 and TP=2+SP. The UMM's caption logits equal
the reference's, and its regressed features equal Emu2's ``generate_image`` loop. With LoRA, the
PEFT export loaded by peft onto the reference and the merged export loaded strictly into it
give the adapted UMM's outputs.
"""

import os

import pytest
import torch

from emu2_reference import (EVA, EXTRA, FFN, HEADS, HIDDEN, ROWS, SLOTS, VISUAL, VOCAB,
                            TinyEmu2, save_hf, save_native, sequences)
from megalora.testing.dist import run_distributed


def _model_cfg(layers, **extra):
    return {"num_layers": layers, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
            "ffn_hidden_size": FFN, "base_vocab": VOCAB, "extra_vocab": EXTRA,
            "image_tokens": SLOTS, "visual_dim": VISUAL, "norm_eps": 1e-6, **extra}


def _run(model, parallel=None, **sections):
    from megalora.umm.config import RunConfig

    return RunConfig.from_dict({"model": model, "parallel": parallel or {},
                                "train": {"device": "cpu"}, **sections})


def _outputs(model, tokens, features, pixels=None):
    """{"logits": [b, s, V_padded], "regressed": [n, visual]} on the last stage, and
    {"features": the pooled encoder slots} on the first stage when the encoder is in the loop
    (None elsewhere): stages run by hand with send/recv, gathered over TP (and SP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megalora.umm.batch import causal_mask, collate

    b, s = tokens.shape
    samples = [{"tokens": tokens[i], "modality": torch.zeros_like(tokens[i]),
                "features": features[i * SLOTS:(i + 1) * SLOTS],
                "pixels": None if pixels is None else pixels[i:i + 1]} for i in range(b)]
    batch = collate(samples, s, model.special)
    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    sp = model.config.sequence_parallel
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    result = {}
    with torch.no_grad():
        decoder_input = model.embed_inputs(batch) if model.pre_process else None
        if model.vision is not None:
            result["features"] = model.visual_inputs(batch)
        if not model.pre_process:
            x = torch.empty(s // (tp if sp else 1), b, HIDDEN)
            dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(x)
        out = model.llm(batch.tokens, positions, causal_mask(s), decoder_input=decoder_input,
                        labels=None)
        if not model.post_process:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return result
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=group)
        hidden = model.llm.umm_hidden
        if sp:
            pieces = [torch.empty_like(hidden) for _ in range(tp)]
            dist.all_gather(pieces, hidden.contiguous(), group=group)
            hidden = torch.cat(pieces, dim=0)
        result["regressed"] = model.project_down(hidden.transpose(0, 1)[batch.image_target_mask])
    result["logits"] = torch.cat(parts, dim=-1)
    return result


EVA_VISION = {"enabled": True, "kind": "eva", "image_size": EVA["image_size"],
              "patch_size": EVA["patch_size"], "hidden_size": VISUAL, "num_layers": EVA["layers"],
              "num_attention_heads": EVA["heads"], "ffn_hidden_size": EVA["mlp"]}


def _worker(rank, world, ckpt, case, tokens, features, pixels, out):
    import megalora
    from megatron.core import parallel_state as ps

    from megalora.umm.ckpt_files import CheckpointFiles
    from megalora.umm.emu2 import export_emu2_merged, export_emu2_peft, import_emu2
    from megalora.umm.model import build_umm

    c = CASES[case]
    run = _run(_model_cfg(c["layers"], emu2_checkpoint=ckpt), c["parallel"],
               **({"vision": EVA_VISION} if c["eva"] else {}))
    ps.initialize_model_parallel(tensor_model_parallel_size=run.parallel.tensor_parallel,
                                 pipeline_model_parallel_size=run.parallel.pipeline_parallel)
    model = build_umm(run).eval()
    read = []
    original = CheckpointFiles.get
    CheckpointFiles.get = lambda self, key, needed_for="": read.append(key) or \
        original(self, key, needed_for)
    try:
        import_emu2(model, ckpt)
    finally:
        CheckpointFiles.get = original
    base = _outputs(model, tokens, features, pixels)
    exclude = ("vision.*.linear_qkv",) if c["eva"] and not c["vision_qkv"] else ()
    megalora.apply_lora(model, megalora.LoRAConfig(rank=4, alpha=8.0, init_b="gaussian",
                                                   rank_pattern={"linear_fc2": 2},
                                                   exclude_modules=exclude,
                                                   target_modules=c.get("targets", TARGETS)))
    adapted = _outputs(model, tokens, features, pixels)
    native_refused = None
    if run.parallel.pipeline_parallel > 1:  # one shard per stage: the HF layout and its index
        try:
            export_emu2_merged(model, os.path.join(out, "native"), layout="native")
        except RuntimeError as exc:  # AgreedError: the same on every rank
            native_refused = str(exc)
    export_emu2_merged(model, os.path.join(out, "merged"), layout=_merged_layout(c))
    refused = None
    try:
        export_emu2_peft(model, os.path.join(out, "peft"), layout="hf")
    except ValueError as exc:
        refused = str(exc)
    return {"base": base, "adapted": adapted, "refused": refused, "read": read,
            "native_refused": native_refused,
            "stage": ps.get_pipeline_model_parallel_rank()}


def _merged_layout(c):
    return "hf" if c["parallel"].get("pipeline_parallel", 1) > 1 else "native"


def _merged_state(folder):
    """A merged export's tensors: one file, or the shards its index names."""
    import json

    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(folder / "model.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        part = load_file(str(folder / shard))
        assert sorted(part) == sorted(k for k, v in weight_map.items() if v == shard)
        state.update(part)
    return state


def _close(got, ref, what):
    tol = 1e-4 * ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


def _hf_twin(native: TinyEmu2, layers: int) -> TinyEmu2:
    """The same weights in the Hugging Face module tree (visual, decoder under model.)."""
    twin = TinyEmu2(layers, "hf", seed=1)
    twin.load_state_dict({k if k.startswith("project_") else "model." + k: v
                          for k, v in native.state_dict().items()}, strict=True)
    return twin.eval()


TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
CASES = {
    # precomputed features; their regression is Emu2's generate_image loop; the output layer
    # adapted too (lm_head: all 74 rows, no TP padding)
    "native-bin-tp2": dict(layers=2, parallel={"tensor_parallel": 2}, eva=False,
                           vision_qkv=False, targets=TARGETS + ("output_layer",)),
    # EVA in the loop, with vision LoRA; the encoder's qkv adapted: merged only (PEFT refused)
    "native-bin-tp2-eva": dict(layers=2, parallel={"tensor_parallel": 2}, eva=True,
                               vision_qkv=True),
    "hf-sharded-pp2-eva": dict(layers=4, parallel={"pipeline_parallel": 2}, eva=True,
                               vision_qkv=False),
    "gen-safetensors-tp2-sp-eva": dict(layers=2, parallel={"tensor_parallel": 2,
                                                           "sequence_parallel": True},
                                       eva=True, vision_qkv=False),
}


def _save(case, ref, layers, tmp_path):
    if case.startswith("native"):
        return save_native(ref, str(tmp_path / "Emu2_pytorch_model.bf16.bin"))
    if case.startswith("hf"):
        return save_hf(_hf_twin(ref, layers), tmp_path / "emu2_hf")
    return save_native(ref, str(tmp_path / "pytorch_model.safetensors"),
                       prefix="multimodal_encoder.", junk=True)


def _reference(model, tokens, pixels, features):
    """(features the decoder reads, caption logits, regressions) of a reference model."""
    if pixels is not None:
        features = model.encode_image(pixels)
    return features, model.caption_logits(tokens, features), model.regressed(tokens, features)


def _compare(got, ref_out, what):
    features, logits, regressed = ref_out
    if "features" in got:
        _close(got["features"], features, f"{what}: EVA slot features")
    _close(got["logits"][..., :ROWS], logits, f"{what}: caption logits")
    _close(got["regressed"], regressed, f"{what}: regressed features")


def _first(results, key):
    return next(r[key] for r in results if key in r)


def _check_reads(results, c):
    """Each rank read its own stage's tensors, each once, and nothing else: no unet/vae, no
    other stage's layers, the encoder only when it is in the loop."""
    stages = c["parallel"].get("pipeline_parallel", 1)
    per_stage = c["layers"] // stages
    for r in results:
        read = [k.split("decoder.lm.", 1)[-1].split("visual.", 1)[-1] for k in r["read"]]
        assert len(read) == len(set(read)) and not any(k.startswith(("unet", "vae"))
                                                       for k in r["read"])
        layers = {int(k.split(".")[2]) for k in read if k.startswith("model.layers.")}
        first, last = r["stage"] == 0, r["stage"] == stages - 1
        assert layers == set(range(r["stage"] * per_stage, (r["stage"] + 1) * per_stage))
        assert ("model.embed_tokens.weight" in read) == first
        assert ("lm_head.weight" in read) == last
        assert any(k.endswith("project_down.weight") for k in read) == last
        assert any(k.endswith("project_up.weight") for k in read) == first
        assert any("visual." in k for k in r["read"]) == (first and c["eva"])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_emu2_import_and_exports_match_reference(tmp_path, case):
    from peft import PeftModel

    c = CASES[case]
    ref = TinyEmu2(c["layers"]).eval()
    ckpt = _save(case, ref, c["layers"], tmp_path)
    tokens = sequences()
    pixels = torch.rand(2, 3, EVA["image_size"], EVA["image_size"],
                        generator=torch.Generator().manual_seed(5)) if c["eva"] else None
    with torch.no_grad():
        if pixels is None:  # Emu2's generate_image loop gives each image's slot features
            features = torch.cat([ref.generate_image(tokens[i, :6]) for i in range(2)])
        else:
            features = ref.encode_image(pixels)
        expected = _reference(ref, tokens, pixels, features)
    if pixels is None:  # teacher-forced (one forward) regression = the loop's
        _close(expected[2], features, "reference: loop vs one forward")
    results = run_distributed(2, _worker, (ckpt, case, tokens, features, pixels,
                                           str(tmp_path)))
    _check_reads(results, c)
    base = {k: _first([r["base"] for r in results], k) for k in results[0]["base"].keys() |
            results[-1]["base"].keys()}
    _compare(base, expected, f"{case}: imported")
    assert not base["logits"][..., ROWS:].any()  # TP padding rows are zero
    adapted = {k: _first([r["adapted"] for r in results], k) for k in base}
    assert (adapted["logits"] - base["logits"]).abs().max() > 0.05 * expected[1].abs().max()

    merged = TinyEmu2(c["layers"], _merged_layout(c), seed=2).eval()
    state = _merged_state(tmp_path / "merged")
    assert not any("inv_freq" in k for k in state)
    merged.load_state_dict(state, strict=True)  # Emu2's loader is strict: the exact key set
    with torch.no_grad():
        _compare(adapted, _reference(merged, tokens, pixels, features), f"{case}: merged")
    if not c["eva"]:  # the encoder is copied from the source checkpoint
        assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items()
                   if k.startswith("visual."))
    if _merged_layout(c) == "hf":  # one shard per stage
        assert len(list((tmp_path / "merged").glob("model-0000?-of-00002.safetensors"))) == 2
        assert all("native Emu2 checkpoint is one file" in r["native_refused"] for r in results)
    if c["vision_qkv"]:
        assert all("attn.qkv.weight directly" in r["refused"] for r in results)
        return
    twin = _hf_twin(ref, c["layers"])
    peft = PeftModel.from_pretrained(twin, str(tmp_path / "peft")).eval()
    assert peft.base_model.model is twin
    with torch.no_grad():
        _compare(adapted, _reference(twin, tokens, pixels, features), f"{case}: PEFT")


# ---------------------------------------------------------------------- in-process, world 1
@pytest.fixture(scope="module")
def emu2_bin(tmp_path_factory):
    ref = TinyEmu2(2).eval()
    path = save_native(ref, str(tmp_path_factory.mktemp("emu2") / "emu2.bin"))
    return ref, path


def test_trainer_reads_extra_vocab_and_matches_reference(megatron_world1, emu2_bin, tmp_path):
    """``model.emu2_checkpoint`` with ``extra_vocab: null``: the trainer's model (adapters
    added, B = 0) reads 6 extra rows and reproduces the reference's caption logits."""
    import megalora
    from megalora.umm.session import build_model

    ref, path = emu2_bin
    run = _run(_model_cfg(2, emu2_checkpoint=path, extra_vocab=None),
               train={"device": "cpu", "out_dir": str(tmp_path)})
    model, _ = build_model(run, torch.device("cpu"))
    assert model.run.model.extra_vocab == EXTRA and run.model.extra_vocab is None
    tokens = sequences()
    megalora.set_head_ids(model, torch.zeros_like(tokens))
    features = torch.randn(2 * SLOTS, VISUAL, generator=torch.Generator().manual_seed(3))
    got = _outputs(model, tokens, features)
    with torch.no_grad():
        _close(got["logits"][..., :ROWS], ref.caption_logits(tokens, features), "trainer")
        _close(got["regressed"], ref.regressed(tokens, features), "trainer regressed")


@pytest.mark.parametrize("field, value, message", [
    ("ffn_hidden_size", 128, r"mlp.gate_proj.weight': the checkpoint has \[172, 64\], so "
                             r"model.ffn_hidden_size must be 172 .*set model.ffn_hidden_size: 172"),
    ("num_layers", 3, r"has 2 decoder layers but model.num_layers=3: set model.num_layers: 2"),
    ("extra_vocab", 0, r"has 74 rows but model.base_vocab=64 \+ 4 special tokens \+ "
                       r"model.extra_vocab=0 = 68: set model.extra_vocab: 6"),
    ("visual_dim", 8, r"'project_up.weight': the checkpoint has \[64, 16\], so model.visual_dim "
                      r"must be 16"),
])
def test_mismatches_name_key_shape_and_field(megatron_world1, emu2_bin, field, value, message):
    from megalora.umm.emu2 import import_emu2
    from megalora.umm.model import build_umm

    cfg = _model_cfg(2, **{field: value})
    model = build_umm(_run(cfg))
    with pytest.raises(ValueError, match=message):
        import_emu2(model, emu2_bin[1])


def test_missing_tensor_unknown_layout_and_bad_configs(megatron_world1, emu2_bin, tmp_path):
    from safetensors.torch import save_file

    from megalora.umm.emu2 import import_emu2, resolve_vocab
    from megalora.umm.model import build_umm

    ref, path = emu2_bin
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    del state["decoder.lm.model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(tmp_path / "holes.safetensors"))
    model = build_umm(_run(_model_cfg(2)))
    with pytest.raises(ValueError, match=r"no tensor 'decoder.lm.model.layers.1.self_attn."
                                         r"k_proj.weight' \(needed for llm.decoder.layers.1"):
        import_emu2(model, str(tmp_path / "holes.safetensors"))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "llama.safetensors"))
    with pytest.raises(ValueError, match="is not an Emu2 checkpoint: it has none of"):
        import_emu2(model, str(tmp_path / "llama.safetensors"))
    with pytest.raises(ValueError, match="fewer than model.base_vocab=100"):
        resolve_vocab(_run(_model_cfg(2, base_vocab=100, extra_vocab=None,
                                      emu2_checkpoint=path)))
    with pytest.raises(ValueError, match="hf_checkpoint and model.emu2_checkpoint are both set"):
        _run(_model_cfg(2, emu2_checkpoint=path, hf_checkpoint="x"))
    with pytest.raises(ValueError, match="extra_vocab=null means"):
        _run(_model_cfg(2, extra_vocab=None))
    with pytest.raises(ValueError, match="cannot hold Emu2's EVA-CLIP: set vision.kind: eva"):
        _run(_model_cfg(2, emu2_checkpoint=path), vision={"enabled": True, "hidden_size": 16})


def test_peft_export_names_and_layouts(megatron_world1, emu2_bin, tmp_path):
    """Native names have no ``model.`` root; target_modules is an exact-name regex (a leaf name
    would also reach EVA's modules); task_type is null (Emu2 is a custom model)."""
    import json

    import megalora
    from safetensors.torch import load_file

    from megalora.umm.emu2 import export_emu2_peft
    from megalora.umm.model import build_umm

    model = build_umm(_run(_model_cfg(2)))
    megalora.apply_lora(model, megalora.LoRAConfig(rank=2, target_modules=("linear_qkv",)))
    cfg = export_emu2_peft(model, str(tmp_path / "native"), layout="native")
    keys = sorted(load_file(str(tmp_path / "native" / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.decoder.lm.model.layers.0.self_attn.k_proj.lora_A.weight"
    assert len(keys) == 2 * 3 * 2 and cfg["task_type"] is None
    assert cfg == json.load(open(tmp_path / "native" / "adapter_config.json"))
    assert cfg["target_modules"].startswith("^(?:decoder\\.lm\\.model\\.layers\\.0\\.self_attn")
    with pytest.raises(ValueError, match="layout must be 'hf' or 'native'"):
        export_emu2_peft(model, str(tmp_path / "x"), layout="gen")


def test_tokenizer_ids_must_be_the_umms(megatron_world1, emu2_bin, tmp_path):
    """A Hugging Face folder's tokenizer is checked: [PAD] [IMG] [/IMG] <image> must be
    base_vocab + 0..3 (Emu2's order of adding them)."""
    import json

    from megalora.umm.emu2 import import_emu2
    from megalora.umm.model import build_umm

    ref, _ = emu2_bin
    folder = save_hf(_hf_twin(ref, 2), tmp_path / "hf", shards=1)
    ids = {"[PAD]": 64, "[IMG]": 65, "[/IMG]": 66, "<image>": 67, "[gIMG]": 68}
    (tmp_path / "hf" / "added_tokens.json").write_text(json.dumps(ids))
    model = build_umm(_run(_model_cfg(2)))
    import_emu2(model, folder)
    (tmp_path / "hf" / "added_tokens.json").write_text(json.dumps({**ids, "[IMG]": 70}))
    with pytest.raises(ValueError, match=r"gives \[IMG\] id 70, but the UMM's \[IMG\] is "
                                         r"model.base_vocab \+ 1 = 65"):
        import_emu2(model, folder)


@pytest.mark.slow
def test_export_commands_write_emu2_names(megatron_world1, emu2_bin, tmp_path):
    """``megalora export-peft`` / ``export-merged`` with model.emu2_checkpoint (TP=1, no
    torchrun) write what the API writes; the merged HF layout loads strictly into Emu2's HF
    module tree."""
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    import megalora
    from helpers import launch_env
    from megalora.umm.emu2 import export_emu2_merged, export_emu2_peft, import_emu2
    from megalora.umm.model import build_umm

    ref, path = emu2_bin
    model_cfg = _model_cfg(2, emu2_checkpoint=path)
    model = build_umm(_run(model_cfg))
    import_emu2(model, path)
    lora = megalora.LoRAConfig(rank=2, alpha=4.0, init_b="gaussian")
    megalora.apply_lora(model, lora)
    megalora.save_adapter(model, str(tmp_path / "adapter.safetensors"))
    export_emu2_peft(model, str(tmp_path / "api_peft"))
    export_emu2_merged(model, str(tmp_path / "api_merged"), layout="hf")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": model_cfg, "train": {"device": "cpu"}}))
    for command, out, extra in (("export-peft", "cli_peft", []),
                                ("export-merged", "cli_merged", ["--layout", "hf"])):
        proc = subprocess.run([sys.executable, "-m", "megalora", command, "--config", str(config),
                               "--adapter", str(tmp_path / "adapter.safetensors"), "--out",
                               str(tmp_path / out), *extra], capture_output=True, text=True,
                              env=launch_env(), timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for api, cli, name in (("api_peft", "cli_peft", "adapter_model.safetensors"),
                           ("api_merged", "cli_merged", "model.safetensors")):
        a, b = load_file(str(tmp_path / api / name)), load_file(str(tmp_path / cli / name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    _hf_twin(ref, 2).load_state_dict(load_file(str(tmp_path / "cli_merged" /
                                                   "model.safetensors")), strict=True)


def test_checkpoint_files_variants_duplicates_and_pickles(tmp_path):
    """A variant index (from_pretrained(variant="bf16")) is read; two lone files holding the
    same tensor, and a pickle with non-tensor objects, are refused by name."""
    import datetime
    import json

    from safetensors.torch import save_file

    from megalora.umm.ckpt_files import CheckpointFiles

    folder = tmp_path / "variant"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-1.bf16.safetensors"))
    (folder / "model.safetensors.index.bf16.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.bf16.safetensors"}}))
    assert torch.equal(CheckpointFiles(str(folder)).get("a"), torch.ones(2))
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("fp32.safetensors", "bf16.safetensors"):
        save_file({"a": torch.ones(2)}, str(twice / name))
    with pytest.raises(ValueError, match="'a' is in both bf16.safetensors and fp32"):
        CheckpointFiles(str(twice))
    torch.save({"args": datetime.timedelta(1), "w": torch.ones(2)}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="is not a torch zip checkpoint of tensors"):
        CheckpointFiles(str(tmp_path / "x.bin"))
