"""apply_lora on a real GPTModel: targets, patterns, freezing, report, merge, spec route."""

import logging

import pytest
import torch

import megalora
from megalora.testing.dist import run_distributed
from megalora.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt, tiny_gpt_config
from megalora.umm.batch import causal_mask

SHAPE = TinyGPTShape()


def _model(tp=1, pp=1, sp=False, dtype=torch.float64):
    return build_tiny_gpt(SHAPE, tiny_gpt_config(SHAPE, tp, pp, sp, dtype=dtype), seed=0)


def _logits(model, tokens, head_ids=None):
    if head_ids is not None:
        megalora.set_head_ids(model, head_ids)
    b, s = tokens.shape
    return model(tokens, torch.arange(s).expand(b, s), causal_mask(s))


@pytest.fixture
def tokens():
    return torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_length),
                         generator=torch.Generator().manual_seed(0))


def test_report_freezing_and_state_dict_names(megatron_world1):
    model = _model()
    base_keys = set(model.state_dict())
    n_base = sum(p.numel() for p in model.parameters())
    report = megalora.apply_lora(model, megalora.LoRAConfig(
        rank=4, num_heads=2, routing="router", rank_pattern={"decoder.layers.1.*": 2}))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_router") for n in trainable)
    assert report.trainable_params == sum(p.numel() for p in trainable.values())
    assert report.frozen_params == n_base
    ranks = {m.name: m.rank for m in report.modules}
    assert len(ranks) == 16
    assert ranks["decoder.layers.1.mlp.linear_fc1"] == 2
    assert ranks["decoder.layers.2.mlp.linear_fc1"] == 4
    keys = set(model.state_dict())
    assert base_keys < keys  # base parameters keep their names: base checkpoints still load
    assert all(k.rsplit(".", 1)[-1].startswith("lora_") for k in keys - base_keys)
    assert "decoder.layers.0.self_attention.linear_qkv.lora_router" in keys
    assert "16 adapted modules" in str(report)


def test_unknown_targets_list_what_exists(megatron_world1):
    with pytest.raises(ValueError, match=r"\['linear_qvk'\] match no adaptable module.*"
                                         r"'linear_fc1', 'linear_fc2', 'linear_proj', "
                                         r"'linear_qkv', 'output_layer'"):
        megalora.apply_lora(_model(), megalora.LoRAConfig(target_modules=("linear_qvk",)))
    with pytest.raises(ValueError, match="rank_pattern"):
        megalora.apply_lora(_model(), megalora.LoRAConfig(rank_pattern={"layers.9.*": 2}))
    model = _model()
    megalora.apply_lora(model, megalora.LoRAConfig())
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        megalora.apply_lora(model, megalora.LoRAConfig())


def test_globs_select_by_global_path(megatron_world1):
    report = megalora.apply_lora(_model(), megalora.LoRAConfig(
        target_modules=("decoder.layers.[02].*",), exclude_modules=("linear_proj",)))
    assert [m.name for m in report.modules] == [
        "decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc2",
        "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.2.mlp.linear_fc1",
        "decoder.layers.2.mlp.linear_fc2", "decoder.layers.2.self_attention.linear_qkv"]


def test_base_gets_no_gradient_and_stays_bit_identical(megatron_world1, tokens):
    model = _model()
    megalora.apply_lora(model, megalora.LoRAConfig(rank=4, init_b="gaussian"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _logits(model, tokens).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n


def test_merge_unmerge_disable_remove(megatron_world1, tokens):
    model = _model()
    base_out = _logits(model, tokens).detach()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    megalora.apply_lora(model, megalora.LoRAConfig(rank=4, num_heads=2, routing="modality",
                                                   init_b="gaussian"))
    ids_all_1 = torch.ones_like(tokens)
    adapted = _logits(model, tokens, ids_all_1).detach()
    assert (adapted - base_out).abs().max() > 1e-4  # the adapter does something
    with megalora.disable_lora(model):
        assert torch.allclose(_logits(model, tokens, ids_all_1), base_out, atol=1e-12)
    with pytest.raises(ValueError, match="pass head=k"):
        megalora.merge_lora(model)
    assert megalora.merge_lora(model, head=1) == 16
    merged = _logits(model, tokens, ids_all_1).detach()
    assert torch.allclose(merged, adapted, atol=1e-10)
    megalora.unmerge_lora(model)
    for key, value in base_state.items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-14), key
    assert torch.allclose(_logits(model, tokens, ids_all_1), adapted, atol=1e-12)
    megalora.remove_lora(model)
    assert type(model.decoder.layers[0].self_attention.linear_qkv).__name__ == \
        "ColumnParallelLinear"
    assert {k for k, v in model.state_dict().items() if torch.is_tensor(v)} == set(base_state)


def test_router_adapters_cannot_merge(megatron_world1):
    model = _model()
    megalora.apply_lora(model, megalora.LoRAConfig(num_heads=2, routing="router"))
    with pytest.raises(ValueError, match="cannot be merged"):
        megalora.merge_lora(model)


def test_head_id_errors(megatron_world1, tokens):
    model = _model()
    megalora.apply_lora(model, megalora.LoRAConfig(num_heads=2, routing="modality"))
    b, s = tokens.shape
    with pytest.raises(RuntimeError, match="needs per-token head ids"):
        _logits(model, tokens)
    with pytest.raises(ValueError, match=r"in \[-1, 1\].*got values in \[0, 2\]"):
        megalora.set_head_ids(model, torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        megalora.set_head_ids(model, torch.zeros(b, s))
    with pytest.raises(ValueError, match=r"cover 8 tokens but this layer sees 32"):
        _logits(model, tokens, torch.zeros(2, 4, dtype=torch.long))
    single = _model()
    megalora.apply_lora(single, megalora.LoRAConfig())
    with pytest.raises(ValueError, match="only read with routing='modality'"):
        megalora.set_head_ids(single, torch.zeros(b, s, dtype=torch.long))
    with pytest.raises(ValueError, match="no LoRA layers"):
        megalora.set_head_ids(_model(), torch.zeros(b, s, dtype=torch.long))


def test_unsupported_module_and_te_message(megatron_world1, caplog):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    shared = GPTModel(config=tiny_gpt_config(SHAPE), transformer_layer_spec=
                      get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=16,
                      share_embeddings_and_output_weights=True)
    with pytest.raises(ValueError, match="output_layer: the layer has no weight of its own"):
        megalora.apply_lora(shared, megalora.LoRAConfig(target_modules=("output_layer",)))
    import megalora.base_layers as bl

    bl._te_checked = False
    with caplog.at_level(logging.DEBUG, logger="megalora"):
        bl.lookup(torch.nn.Linear(2, 2))
    assert "transformer-engine not importable" in caplog.text and "TE linear support skipped" \
        in caplog.text


def test_spec_route_equals_post_build(megatron_world1, tokens):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megalora.cpu import cpu_gpt_block_spec
    from megalora.base_init import init_base_deterministic

    cfg = tiny_gpt_config(SHAPE, dtype=torch.float64)
    lcfg = megalora.LoRAConfig(rank=4, init_b="gaussian", target_modules=("linear_qkv",
                                                                           "linear_fc2"))
    spec = megalora.lora_layer_spec(cpu_gpt_block_spec(cfg), lcfg)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=SHAPE.vocab_size,
                     max_sequence_length=SHAPE.seq_length,
                     share_embeddings_and_output_weights=False)
    init_base_deterministic(model, 0)
    layer = model.decoder.layers[0]
    assert type(layer.self_attention.linear_qkv).__name__ == "LoRAColumnParallelLinear"
    assert type(layer.self_attention.linear_proj).__name__ == "RowParallelLinear"
    with pytest.raises(RuntimeError, match="call megalora.apply_lora"):
        _logits(model, tokens)
    megalora.apply_lora(model, lcfg)
    post = _model()
    megalora.apply_lora(post, lcfg)
    assert set(megalora.adapter_state(model)) == set(megalora.adapter_state(post))
    assert torch.allclose(_logits(model, tokens), _logits(post, tokens), atol=1e-12)


def _tp2_merge(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model = _model(tp=2, sp=True)
    megalora.apply_lora(model, megalora.LoRAConfig(rank=4, init_b="gaussian"))
    toks = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_length),
                         generator=torch.Generator().manual_seed(0))
    before = _logits(model, toks).detach()
    megalora.merge_lora(model)
    after = _logits(model, toks).detach()
    return (after - before).abs().max().item(), before.abs().max().item()


@pytest.mark.slow
def test_merge_is_local_under_tp2_sp():
    for diff, scale in run_distributed(2, _tp2_merge):
        assert diff <= 1e-12 * max(1.0, scale)


# ---------------------------------------------------------------------- misuse (issue 15)
def test_apply_after_ddp_wrapping_is_refused(megatron_world1):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = tiny_gpt_config(SHAPE)
    for wrap in (lambda m: DistributedDataParallel(config=cfg, module=m,
                                                   ddp_config=DistributedDataParallelConfig()),
                 torch.nn.parallel.DistributedDataParallel):
        model = build_tiny_gpt(SHAPE, cfg, seed=0)
        wrapped = wrap(model)
        with pytest.raises(ValueError, match=r"already wrapped in .*DistributedDataParallel.*"
                                             r"apply_lora on the bare model first, then wrap"):
            megalora.apply_lora(wrapped, megalora.LoRAConfig())
        assert not any("lora" in n for n, _ in model.named_parameters())
        assert all(p.requires_grad for p in model.parameters())  # nothing frozen either
    model = build_tiny_gpt(SHAPE, cfg, seed=0)  # the right order: every adapter in DDP's buffers
    megalora.apply_lora(model, megalora.LoRAConfig())
    DistributedDataParallel(config=cfg, module=model, ddp_config=DistributedDataParallelConfig())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(hasattr(p, "main_grad") for p in trainable)


def test_head_ids_in_seq_batch_order_are_refused(megatron_world1, tokens):
    model = _model()
    megalora.apply_lora(model, megalora.LoRAConfig(num_heads=2, routing="modality"))
    b, s = tokens.shape
    ids = torch.randint(0, 2, (b, s), generator=torch.Generator().manual_seed(1))
    _logits(model, tokens, ids)  # [batch, seq]: fine
    with pytest.raises(ValueError, match=rf"given as \[{s}, {b}\] but this forward has "
                                         rf"batch={b}, seq={s}: set_head_ids expects "
                                         rf"\[batch, seq\] = \[{b}, {s}\]"):
        _logits(model, tokens, ids.t().contiguous())  # same count, [seq, batch]


def test_model_without_lora_is_an_error(megatron_world1, tmp_path):
    adapted = _model()
    megalora.apply_lora(adapted, megalora.LoRAConfig())
    path = str(tmp_path / "adapter.safetensors")
    megalora.save_adapter(adapted, path)
    bare = _model()
    for call in (lambda: megalora.load_adapter(bare, path),
                 lambda: megalora.load_adapter(bare, path, strict=False),
                 lambda: megalora.merge_lora(bare), lambda: megalora.unmerge_lora(bare),
                 lambda: megalora.save_adapter(bare, path)):
        with pytest.raises(ValueError, match=r"no LoRA .*call megalora.apply_lora\(model, "
                                             r"config\) first"):
            call()
    megalora.remove_lora(adapted)
    with pytest.raises(ValueError, match="no LoRA"):
        megalora.merge_lora(adapted)


def test_rank_larger_than_the_layer_warns(megatron_world1, caplog):
    big = "decoder.layers.1.self_attention.linear_proj"  # 64 x 64
    with caplog.at_level(logging.WARNING, logger="megalora"):
        megalora.apply_lora(_model(), megalora.LoRAConfig(rank=4, rank_pattern={big: 96}))
    assert caplog.text.count("LoRA rank exceeds") == 1
    assert f"{big} (r=96, in=64, out=64)" in caplog.text
    assert "layers.0.self_attention.linear_proj" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megalora"):
        megalora.apply_lora(_model(), megalora.LoRAConfig(rank=64))
    assert "LoRA rank exceeds" not in caplog.text  # r = min(in, out) is allowed
