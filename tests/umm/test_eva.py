"""megalora.umm.eva against a float64 reference written from Emu2's own code
(``Emu2/emu/eva_vit.py``: Attention with ``F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))``,
residual post-norm Block, GELU Mlp; ``Emu2/emu/emu.py: encode_image``'s pooling), on tiny
random encoders saved under Emu2's key names in each checkpoint layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megalora.umm.eva import EVAConfig, EVAEncoder, eva_pool, load_eva, load_image_eva, \
    normalize, read_visual

TINY = dict(image_size=16, patch_size=4, width=16, layers=2, heads=2, mlp=40)


def _state(cfg: EVAConfig, seed: int = 0):
    """Random weights under Emu2's ``visual.*`` names (without the root): non-trivial norms,
    biases and position embedding, so every term of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    d, f, p = cfg.width, cfg.mlp, cfg.patch_size

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    state = {"patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d),
             "cls_token": r(1, 1, d), "pos_embed": r(1, cfg.grid ** 2 + 1, d)}
    for i in range(cfg.layers):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(d, scale=0.2), b + "norm1.bias": r(d),
                      b + "attn.qkv.weight": r(3 * d, d), b + "attn.q_bias": r(d),
                      b + "attn.v_bias": r(d), b + "attn.proj.weight": r(d, d),
                      b + "attn.proj.bias": r(d), b + "norm2.weight": 1 + r(d, scale=0.2),
                      b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(f, d),
                      b + "mlp.fc1.bias": r(f), b + "mlp.fc2.weight": r(d, f),
                      b + "mlp.fc2.bias": r(d)})
    return state


def _reference(state, pixels, heads, image_tokens, eps=1e-6):
    """Emu2's EVA forward and encode_image, functionally, in the dtype of ``state``."""
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), dtype=pixels.dtype).view(1, 3, 1, 1)
    w = state["patch_embed.proj.weight"]
    x = F.conv2d((pixels - mean) / std, w, state["patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    b, n, d = x.shape
    x = torch.cat([state["cls_token"].expand(b, -1, -1), x], dim=1) + state["pos_embed"]
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(layers):
        s = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        qkv_bias = torch.cat([s["attn.q_bias"], torch.zeros_like(s["attn.v_bias"]),
                              s["attn.v_bias"]])
        qkv = F.linear(x, s["attn.qkv.weight"], qkv_bias)
        q, k, v = qkv.reshape(b, n + 1, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q = q * (d // heads) ** -0.5
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        o = F.linear((attn @ v).transpose(1, 2).reshape(b, n + 1, -1), s["attn.proj.weight"],
                     s["attn.proj.bias"])
        x = x + F.layer_norm(o, (d,), s["norm1.weight"], s["norm1.bias"], eps)
        m = F.linear(F.gelu(F.linear(x, s["mlp.fc1.weight"], s["mlp.fc1.bias"])),
                     s["mlp.fc2.weight"], s["mlp.fc2.bias"])
        x = x + F.layer_norm(m, (d,), s["norm2.weight"], s["norm2.bias"], eps)
    # encode_image: drop CLS, [b, c, grid, grid], avg_pool2d with stride grid // sqrt(n_query)
    grid, stride = math.isqrt(n), math.isqrt(n) // math.isqrt(image_tokens)
    y = x[:, 1:].permute(0, 2, 1).reshape(b, d, grid, grid)
    y = F.avg_pool2d(y, kernel_size=stride, stride=stride)
    return x, y.view(b, d, -1).permute(0, 2, 1)


def _save(state, path, root, extra=True):
    full = {root + k: v.to(torch.bfloat16 if path.suffix == ".bin" else torch.float32)
            for k, v in state.items()}
    if extra:  # what else an Emu2 checkpoint holds: none of it may be read into the encoder
        full.update({"decoder.lm.model.norm.weight": torch.ones(4),
                     "project_up.weight": torch.ones(4, 4), "unet.conv.weight": torch.ones(2)})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(full, str(path))
    else:
        torch.save(full, path)


@pytest.mark.parametrize("name, root", [("native.bin", "visual."),
                                        ("hf.safetensors", "model.visual."),
                                        ("gen.safetensors", "multimodal_encoder.visual.")])
def test_eva_matches_emu2s_encoder_in_every_layout(tmp_path, name, root):
    cfg = EVAConfig(**TINY)
    state = _state(cfg)
    path = tmp_path / name
    _save(state, path, root)
    stored = read_visual(str(path))
    assert set(stored) == set(state)  # only the encoder's tensors, without the root
    stored64 = {k: v.to(torch.float64) for k, v in stored.items()}
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    tokens64, slots64 = _reference(stored64, pixels, cfg.heads, 4)
    ref32 = {k: v.to(torch.float32) for k, v in stored64.items()}
    tokens_ref32, slots_ref32 = _reference(ref32, pixels.float(), cfg.heads, 4)
    model = load_eva(stored, heads=cfg.heads, dtype=torch.float32)
    assert model.cfg == cfg
    with torch.no_grad():
        tokens = model(normalize(pixels.float()))
        slots = model.encode(pixels.float(), image_tokens=4)
    assert slots.shape == (3, 4, 16) and tokens.shape == (3, 17, 16)
    for ours, ref32_, ref64 in ((tokens, tokens_ref32, tokens64), (slots, slots_ref32, slots64)):
        err = (ours.double() - ref64).abs().max().item()
        ref_err = (ref32_.double() - ref64).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)
    # float64 all the way: the same function (SDPA vs explicit softmax aside)
    model64 = load_eva(stored64, heads=cfg.heads, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model64.encode(pixels, 4), slots64, rtol=1e-12, atol=1e-12)


def test_eva_pool_is_emu2s_avg_pool_and_refuses_uneven_grids():
    x = torch.randn(2, 64, 5, dtype=torch.float64)  # an 8x8 grid
    out = eva_pool(x, 4)
    grid = x.view(2, 8, 8, 5)
    for slot, (r, c) in enumerate((r, c) for r in range(2) for c in range(2)):  # row-major
        torch.testing.assert_close(out[:, slot], grid[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
                                   .mean(dim=(1, 2)), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(eva_pool(x, 64), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dividing 64 patches evenly"):
        eva_pool(x, 9)


def test_eva_sizes_closed_form_equals_built_modules():
    for cfg in (EVAConfig(**TINY), EVAConfig()):  # EVAConfig(): Emu2's EVA-CLIP-E
        with torch.device("meta"):
            model = EVAEncoder(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.parameters()
    # Emu2's encoder: 4 + 64 x 13 tensors, 4,350,093,568 parameters (the figure from Emu2's
    # published structure, recomputed by hand: 64 x 67,924,992 + conv, CLS, positions)
    assert EVAConfig().parameters() == 64 * 67_924_992 + (3 * 14 * 14 + 1) * 1792 + 1792 + \
        1025 * 1792 == 4_350_093_568
    assert len(EVAEncoder(EVAConfig(**TINY)).state_dict()) == 4 + 2 * 13


def test_eva_checkpoint_errors_name_the_tensor(tmp_path):
    cfg = EVAConfig(**TINY)
    state = {k: v.float() for k, v in _state(cfg).items()}
    bad = dict(state, **{"blocks.1.attn.q_bias": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"'visual.blocks.1.attn.q_bias': checkpoint \[8\], "
                                         r"the encoder expects \[16\]"):
        load_eva(bad, heads=2)
    missing = {k: v for k, v in state.items() if k != "blocks.0.attn.v_bias"}
    with pytest.raises(ValueError, match=r"missing \['visual.blocks.0.attn.v_bias'\]"):
        load_eva(missing, heads=2)
    with pytest.raises(ValueError, match="width 16 is not divisible by heads 3"):
        load_eva(state, heads=3)
    path = tmp_path / "llm_only.safetensors"
    _save({"x": torch.zeros(1)}, path, "decoder.lm.")
    with pytest.raises(ValueError, match="no EVA encoder in this checkpoint"):
        read_visual(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_visual(str(tmp_path / "nope.bin"))
    torch.save({"visual.pos_embed": torch.zeros(1, 17, 16)}, tmp_path / "legacy.bin",
               _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    with pytest.raises(ValueError, match="not a torch zip checkpoint .* convert it once to "
                                         ".safetensors"):
        read_visual(str(tmp_path / "legacy.bin"))
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 16, 16\]"):
        load_eva(state, heads=2)(torch.zeros(1, 3, 8, 8))


def test_load_image_eva_squashes_bicubic_like_emu2(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (30, 20))
    img.putdata([((7 * i) % 256, (3 * i) % 256, (11 * i) % 256) for i in range(600)])
    img.save(tmp_path / "wide.png")
    got = load_image_eva(str(tmp_path / "wide.png"), size=16)
    want = torch.tensor(list(img.resize((16, 16), Image.BICUBIC).getdata()),
                        dtype=torch.float32).view(16, 16, 3).permute(2, 0, 1) / 255
    assert torch.equal(got, want)


# --- megalora eva-features ------------------------------------------------------------------

def _images(folder, n=5):
    """Small RGB images, one of them not square and one in a sub-folder."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    names = [f"img{i}.png" for i in range(n - 1)] + ["sub/wide.jpg"]
    for i, name in enumerate(names):
        w, h = (24, 12) if name.endswith("wide.jpg") else (16 + 4 * i, 16 + 4 * i)
        data = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data).save(folder / name)
    return names


def _checkpoint(tmp_path, scale=1.0, poison=False):
    cfg = EVAConfig(**TINY)
    state = {k: v * scale for k, v in _state(cfg).items()}
    if poison:
        state["pos_embed"][0, 3, 0] = float("nan")
    path = tmp_path / "emu2.safetensors"
    _save(state, path, "visual.")
    return path, {k: v.to(torch.float32).to(torch.float64) for k, v in state.items()}


def test_eva_features_match_the_reference_resume_and_split_over_processes(tmp_path, capsys):
    import numpy as np

    from megalora.cli import main
    from megalora.umm.eva_features import EVAFeaturesConfig, extract

    ckpt, state64 = _checkpoint(tmp_path)
    names = _images(tmp_path / "imgs")
    args = ["eva-features", "--checkpoint", str(ckpt), "--images", str(tmp_path / "imgs"),
            "--out", str(tmp_path / "one"), "--heads", "2", "--image-tokens", "4",
            "--batch", "2"]
    assert main(args) == 0
    assert "wrote 5, skipped 0 already done, of 5 images" in capsys.readouterr().out
    for name in names:  # Emu2's preparation (PIL bicubic squash) and encoder, in float64
        pixels = load_image_eva(str(tmp_path / "imgs" / name), 16).double().unsqueeze(0)
        _, want = _reference(state64, pixels, 2, 4)
        _, want32 = _reference({k: v.float() for k, v in state64.items()}, pixels.float(), 2, 4)
        got = np.load(tmp_path / "one" / (name + ".npy"))
        assert got.shape == (4, 16) and got.dtype == np.float32
        err = (torch.from_numpy(got).double() - want[0]).abs().max().item()
        assert err <= 2 * (want32[0].double() - want[0]).abs().max().item() + 1e-6, name
    # two processes (rank 0 and 1 of 2) write the same files with the same features
    cfg = EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path / "imgs"),
                            out=str(tmp_path / "two"), heads=2, image_tokens=4, batch=2)
    counts = [extract(cfg, rank, 2, progress=lambda m: None) for rank in (0, 1)]
    assert [c["written"] for c in counts] == [3, 2]
    for name in names:
        np.testing.assert_allclose(np.load(tmp_path / "two" / (name + ".npy")),
                                   np.load(tmp_path / "one" / (name + ".npy")), rtol=0,
                                   atol=1e-6)
    # resume: only the missing file is encoded again; the others are not touched
    one = tmp_path / "one"
    before = {n: (one / (n + ".npy")).stat().st_mtime_ns for n in names}
    (one / "img2.png.npy").unlink()
    cfg1 = EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path / "imgs"),
                             out=str(one), heads=2, image_tokens=4)
    assert extract(cfg1, progress=lambda m: None) == {"total": 5, "mine": 5, "skipped": 4,
                                                       "written": 1}
    assert all((one / (n + ".npy")).stat().st_mtime_ns == before[n] for n in names
               if n != "img2.png")
    # a list file names images relative to its own folder
    (tmp_path / "imgs" / "list.txt").write_text("sub/wide.jpg\nimg0.png\n")
    listed = EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path / "imgs" / "list.txt"),
                               out=str(tmp_path / "listed"), heads=2, image_tokens=4)
    assert extract(listed, progress=lambda m: None)["written"] == 2
    assert sorted(p.name for p in (tmp_path / "listed").rglob("*.npy")) == ["img0.png.npy",
                                                                           "wide.jpg.npy"]


def test_eva_features_refuse_what_cannot_be_stored(tmp_path):
    from megalora.umm.eva_features import EVAFeaturesConfig, extract

    _images(tmp_path / "imgs", n=2)
    ckpt, _ = _checkpoint(tmp_path, poison=True)
    cfg = EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path / "imgs"),
                            out=str(tmp_path / "out"), heads=2, image_tokens=4)
    with pytest.raises(FloatingPointError, match="are not finite; nothing was saved"):
        extract(cfg, progress=lambda m: None)
    assert not list(tmp_path.glob("out/**/*.npy"))
    (tmp_path / "emu2.safetensors").unlink()
    ckpt, _ = _checkpoint(tmp_path, scale=1e5)  # outputs beyond float16's 65504
    big = EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path / "imgs"),
                            out=str(tmp_path / "big"), heads=2, image_tokens=4, dtype="float16")
    with pytest.raises(ValueError, match="exceed float16's range"):
        extract(big, progress=lambda m: None)
    with pytest.raises(ValueError, match="--dtype must be float32 or float16"):
        EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path), out="o", dtype="int8")
    with pytest.raises(FileNotFoundError, match="--images"):
        EVAFeaturesConfig(checkpoint=str(ckpt), images=str(tmp_path / "nope"), out="o")


def test_read_visual_from_a_sharded_folder_and_a_wrapped_bin(tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = EVAConfig(**TINY)
    state = {k: v.float() for k, v in _state(cfg).items()}
    keys = sorted(state)
    shards = {"model-00001-of-00003.safetensors": keys[:10],
              "model-00002-of-00003.safetensors": keys[10:],
              "model-00003-of-00003.safetensors": []}  # the decoder's: never opened
    folder = tmp_path / "hf"
    folder.mkdir()
    weight_map = {}
    for name, part in shards.items():
        tensors = {"model.visual." + k: state[k] for k in part}
        if not part:
            tensors = {"model.decoder.lm.model.norm.weight": torch.ones(4)}
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model-00003-of-00003.safetensors").write_bytes(b"not read")
    got = read_visual(str(folder))
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    # Emu2's loader unwraps {"module": state}; so does ours
    torch.save({"module": {"visual." + k: v for k, v in state.items()}}, tmp_path / "w.bin")
    assert set(read_visual(str(tmp_path / "w.bin"))) == set(state)
    (tmp_path / "two").mkdir()
    for name in ("a.bin", "b.bin"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no model.safetensors.index.json or"):
        read_visual(str(tmp_path / "two"))


def test_eva_features_refuse_escaping_paths_stale_outputs_and_bad_images(tmp_path, capsys):
    from megalora.umm.eva_features import EVAFeaturesConfig, extract, list_images

    ckpt, _ = _checkpoint(tmp_path)
    _images(tmp_path / "imgs", n=2)
    listing = tmp_path / "imgs" / "list.txt"
    for bad in ("../secret.png", "/etc/x.png"):
        listing.write_text(f"img0.png\n{bad}\n")
        with pytest.raises(ValueError, match=r"list.txt:2: .* leaves the list's folder"):
            list_images(str(listing))

    def cfg(**kw):
        return EVAFeaturesConfig(**{**dict(checkpoint=str(ckpt), images=str(tmp_path / "imgs"),
                                           out=str(tmp_path / "out"), heads=2,
                                           image_tokens=4), **kw})

    with pytest.raises(ValueError, match="dividing 16 patches evenly"):
        extract(cfg(image_tokens=9), progress=lambda m: None)
    assert not (tmp_path / "out" / "eva-features.json").exists()  # nothing claimed by a failure
    assert extract(cfg(), progress=lambda m: None)["written"] == 2
    # every image done: other settings are still refused, not taken as done
    with pytest.raises(ValueError, match="holds features made with") as done:
        extract(cfg(image_tokens=1), progress=lambda m: None)
    (tmp_path / "out" / "img0.png.npy").unlink()
    with pytest.raises(ValueError, match="holds features made with"):
        extract(cfg(image_tokens=1), progress=lambda m: None)
    # the same on every rank: rank 0 prints it once, other ranks print nothing
    from megalora.errors import report

    assert report(done.value, 1, verbose=False) == 2
    assert capsys.readouterr().err == ""
    assert report(done.value, 0, verbose=False) == 2
    assert capsys.readouterr().err.startswith("megalora: error: ")
    (tmp_path / "imgs" / "img0.png").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="image 'img0.png' .* cannot be read"):
        extract(cfg(), progress=lambda m: None)
