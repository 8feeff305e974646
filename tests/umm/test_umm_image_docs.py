"""Documents with raw text and image files through the converter, and the frozen patch-PCA
encoder: features equal the encoder applied to pixels computed here with Pillow, the encoder
equals scikit-learn's PCA, batching does not change the dataset, and every bad input names the
document and segment."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megalora.umm.convert import convert_jsonl
from megalora.umm.data import UMMDataset
from megalora.umm.encoders import PatchPCAEncoder, load_encoder, save_encoder
from megalora.umm.tokens import IMAGE, TEXT, SpecialTokens

SIZE, GRID, DIMS, VOCAB = 16, 2, 12, 256


def _random_images(n, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def encoder():
    return PatchPCAEncoder.fit(_random_images(64), GRID, DIMS)


def _save_png(path, rgba_array):
    Image.fromarray(rgba_array, "RGBA").save(path)


def _expected_pixels(path):
    """What the converter must store for an image file, computed independently with Pillow:
    composited on white, resized with Lanczos to SIZE."""
    im = Image.open(path).convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    bg.alpha_composite(im)
    rgb = bg.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    return torch.tensor(np.asarray(rgb), dtype=torch.float32).permute(2, 0, 1) / 255.0


def _docs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)  # transparency, resized 32 -> 16
    _save_png(tmp_path / "img" / "a.png", rgba)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        tmp_path / "img" / "b.jpg", quality=90)
    lines = [{"segments": [{"text": "grinning face"}, {"image_file": "img/a.png"}]},
             {"segments": [{"image_file": "img/b.jpg"}, {"text": "café ☕"},
                           {"image_file": "img/a.png"}]},
             {"segments": [{"text": "text only"}, {"tokens": [1, 2]}]}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _convert(path, out, encoder, **kw):
    kw.setdefault("feature_dtype", "float32")
    convert_jsonl(str(path), str(out), base_vocab=kw.pop("base_vocab", VOCAB),
                  image_tokens=GRID * GRID, visual_dim=DIMS, encoder=encoder, **kw)
    return UMMDataset.open(str(out), base_vocab=VOCAB, image_tokens=GRID * GRID, visual_dim=DIMS)


def test_image_documents_convert_to_encoder_features(tmp_path, encoder):
    path = _docs(tmp_path)
    ds = _convert(path, tmp_path / "out", encoder, pixels=True)
    sp, n = SpecialTokens(VOCAB), GRID * GRID
    image = [sp.img_start] + [sp.img_slot] * n + [sp.img_end]
    a, b = _expected_pixels(tmp_path / "img" / "a.png"), _expected_pixels(tmp_path / "img/b.jpg")
    want = [(list(b"grinning face") + image, [a]),
            (image + list("café ☕".encode()) + image, [b, a]),
            (list(b"text only") + [1, 2], [])]
    assert len(ds) == 3
    for i, (tokens, pixels) in enumerate(want):
        got = ds[i]
        assert got["tokens"].tolist() == tokens, i
        expect_mod = [IMAGE if t in (sp.img_start, sp.img_slot) else TEXT for t in tokens]
        assert got["modality"].tolist() == expect_mod, i
        if pixels:
            ref = torch.stack(pixels)
            torch.testing.assert_close(got["pixels"].float(), ref, atol=1e-3, rtol=0)  # fp16
            torch.testing.assert_close(got["features"], encoder.encode(ref).reshape(-1, DIMS),
                                       atol=1e-5, rtol=1e-5)
        else:
            assert got["features"].shape == (0, DIMS) and got["pixels"].shape[0] == 0


def test_batching_does_not_change_the_dataset(tmp_path, encoder):
    path = _docs(tmp_path)
    one = _convert(path, tmp_path / "one", encoder, image_batch=1)
    many = _convert(path, tmp_path / "many", encoder, image_batch=256)
    for i in range(len(one)):
        for key in ("tokens", "modality", "features"):
            assert torch.equal(one[i][key], many[i][key]), (i, key)


def test_patch_pca_matches_sklearn_and_round_trips(tmp_path, encoder):
    from sklearn.decomposition import PCA

    imgs = _random_images(64)
    patches = imgs.reshape(64, 3, GRID, SIZE // GRID, GRID, SIZE // GRID)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * (SIZE // GRID) ** 2).double()
    pca = PCA(n_components=DIMS, svd_solver="full").fit(patches.numpy())
    comps = torch.tensor(pca.components_)
    signs = torch.sign((comps * encoder.components).sum(1))  # PCA fixes no sign
    torch.testing.assert_close(encoder.components, comps * signs.unsqueeze(1), atol=1e-8,
                               rtol=0)
    feats = encoder.encode(imgs[:5]).double().reshape(-1, DIMS)
    ref = torch.tensor(pca.transform(patches[: 5 * GRID * GRID].numpy())) * signs
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    # decode inverts encode on the components' span, exactly with every component kept
    full = PatchPCAEncoder.fit(imgs, GRID, 3 * (SIZE // GRID) ** 2)
    torch.testing.assert_close(full.decode(full.encode(imgs[:3])), imgs[:3], atol=1e-5, rtol=0)
    # saved and loaded: the same encoder, bit for bit
    back = load_encoder(save_encoder(encoder, str(tmp_path / "enc.safetensors")))
    assert torch.equal(back.encode(imgs[:2]), encoder.encode(imgs[:2]))
    assert PatchPCAEncoder.fit(imgs, GRID, DIMS).components.equal(encoder.components)


def test_encoder_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder file .* does not exist"):
        load_encoder(str(tmp_path / "none.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_encoder(str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="dims must be in \\[1, 192\\]"):
        PatchPCAEncoder.fit(_random_images(4), GRID, 193)


def _one_doc(tmp_path, segments):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"segments": segments}) + "\n")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: [{"image_file": "img/missing.png"}],
     r"line 1 segment 0: image file .*missing.png' does not exist"),
    (lambda d: [{"text": "x"}, {"image_file": "img/garbage.png"}],
     r"line 1 segment 1: image file .*garbage.png' is not a readable image"),
    (lambda d: [{"image_file": "img/wide.png"}],
     r"line 1 segment 0: image file .*wide.png' is 20x16; images must be square"),
    (lambda d: [{"image_file": 7}], r"line 1 segment 0: 'image_file' must be a path string"),
    (lambda d: [{"text": ["a"]}], r"line 1 segment 0: 'text' must be a string"),
    (lambda d: [{"image_file": "img/ok.png", "caption": "x"}],
     r"line 1 segment 0: unknown segment .* or \{'image_file': 'x.png'\}"),
])
def test_bad_image_documents_name_the_document_and_field(tmp_path, encoder, make, message):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "garbage.png").write_bytes(b"not an image")
    Image.new("RGB", (20, 16)).save(tmp_path / "img" / "wide.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "ok.png")
    path = _one_doc(tmp_path, make(tmp_path))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _convert(path, tmp_path / "out", encoder)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_image_files_need_an_encoder_and_a_fitting_vocabulary(tmp_path, encoder):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "ok.png")
    path = _one_doc(tmp_path, [{"image_file": "img/ok.png"}])
    with pytest.raises(ValueError, match="line 1 segment 0: an image file needs a frozen "
                                         "encoder .*pass --encoder PATH"):
        _convert(path, tmp_path / "out", None)
    path = _one_doc(tmp_path, [{"text": "é"}])  # UTF-8 bytes 0xC3 0xA9
    with pytest.raises(ValueError, match=r"line 1 segment 0: the tokenizer gave id 195, outside "
                                         r"\[0, base_vocab=128\).*at least that"):
        convert_jsonl(str(path), str(tmp_path / "out"), base_vocab=128, image_tokens=4,
                      visual_dim=DIMS, encoder=encoder)
    with pytest.raises(ValueError, match=r"the encoder gives \[4, 12\] features per image but "
                                         r"--image-tokens 8 --visual-dim 12"):
        convert_jsonl(str(path), str(tmp_path / "out"), base_vocab=VOCAB, image_tokens=8,
                      visual_dim=DIMS, encoder=encoder)


def test_convert_cli_with_an_encoder(tmp_path, encoder):
    path = _docs(tmp_path)
    enc = save_encoder(encoder, str(tmp_path / "enc.safetensors"))
    out = subprocess.run([sys.executable, "-m", "megalora.umm.convert", "--jsonl", str(path),
                          "--out", str(tmp_path / "cli"), "--base-vocab", str(VOCAB),
                          "--encoder", enc, "--feature-dtype", "float32"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote 3 samples" in out.stdout
    cli = UMMDataset.open(str(tmp_path / "cli"), base_vocab=VOCAB, image_tokens=GRID * GRID,
                          visual_dim=DIMS)
    api = _convert(path, tmp_path / "api", encoder)
    for i in range(3):
        assert torch.equal(cli[i]["features"], api[i]["features"])
