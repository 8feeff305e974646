"""UMM data: synthetic structure, on-disk round trip, converter, validation errors, DP stream."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megalora.umm.batch import UMMBatch
from megalora.umm.convert import convert_jsonl, main as convert_main
from megalora.umm.data import (FORMAT, DataStream, UMMDataset, shard_name, validate_sample,
                               write_dataset)
from megalora.umm.synthetic import (NOISE_STD, NUM_CONCEPTS, SyntheticSpec, structure,
                                    synthetic_samples, write_synthetic)
from megalora.umm.tokens import IMAGE, PAD_MODALITY, TEXT, SpecialTokens

V, N, D = 64, 4, 16  # base_vocab, image_tokens, visual_dim of the small specs below
SP = SpecialTokens(V)
DIMS = dict(base_vocab=V, image_tokens=N, visual_dim=D)


def _spec(**kw):
    base = dict(num_samples=24, seq_length=48, base_vocab=V, image_tokens=N, visual_dim=D,
                images_per_sample=2)
    base.update(kw)
    return SyntheticSpec(**base)


def _text_sample(toks, feats_rows=0):
    t = torch.tensor(toks)
    return {"tokens": t, "modality": torch.zeros_like(t), "features": torch.zeros(feats_rows, D)}


def _image_sample():
    """3 text tokens, one image, 2 text tokens: tokens, modality and features built by hand."""
    toks = [5, 6, 7, SP.img_start] + [SP.img_slot] * N + [SP.img_end, 9, 10]
    mod = [0, 0, 0, 1] + [1] * N + [0, 0, 0]
    return {"tokens": torch.tensor(toks), "modality": torch.tensor(mod),
            "features": torch.arange(N * D, dtype=torch.float32).reshape(N, D) / 10}


def _assert_samples_equal(got, want, feature_cast=torch.float32):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["tokens"].dtype == torch.int64 and g["modality"].dtype == torch.int64
        assert torch.equal(g["tokens"], w["tokens"])
        assert torch.equal(g["modality"], w["modality"])
        assert g["features"].dtype == torch.float32
        assert torch.equal(g["features"], w["features"].to(feature_cast).float())
        if "pixels" in w:
            assert torch.equal(g["pixels"], w["pixels"].half().float())
        else:
            assert "pixels" not in g


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_seeded():
    a, b = synthetic_samples(_spec()), synthetic_samples(_spec())
    _assert_samples_equal(a, b)
    c = synthetic_samples(_spec(seed=1))
    assert any(not torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # The maps come from structure_seed only, so splits drawn with other seeds share them.
    assert torch.equal(structure(_spec(seed=1)).codebook, structure(_spec()).codebook)
    assert not torch.equal(structure(_spec(structure_seed=3)).codebook, structure(_spec()).codebook)


def _spans(sample):
    """[(text span, concept features, pixels or None)] parsed from tokens alone."""
    toks = sample["tokens"].tolist()
    spans, cur, k, img = [], [], 0, 0
    while k < len(toks):
        if toks[k] == SP.img_start:
            assert toks[k + 1:k + 2 + N] == [SP.img_slot] * N + [SP.img_end]
            spans.append((cur, sample["features"][img * N:(img + 1) * N], img))
            cur, k, img = [], k + N + 2, img + 1
        else:
            cur.append(toks[k])
            k += 1
    spans.append((cur, None, None))
    return spans


@pytest.mark.parametrize("with_pixels", [False, True])
def test_synthetic_structure_holds(with_pixels):
    spec = _spec(num_samples=40, with_pixels=with_pixels)
    st = structure(spec)
    R, U = st.rotation, st.codebook
    assert torch.equal(R @ R.T, torch.eye(D))  # orthogonal
    residuals = []
    for s in synthetic_samples(spec):
        validate_sample(s, SP, N, D, where="synthetic")
        assert s["tokens"].numel() <= spec.seq_length
        spans = _spans(s)
        assert len(spans) == spec.images_per_sample + 1
        for k, (text, feats, img) in enumerate(spans):
            assert len(text) >= 2
            assert all((b - a) % V == 1 for a, b in zip(text, text[1:]))  # counts up mod V
            if feats is None:
                continue
            c = text[-1] % NUM_CONCEPTS
            assert spans[k + 1][0][0] == (5 * c + 3) % V  # text after the image
            clean = torch.stack([torch.linalg.matrix_power(R, j) @ U[c] for j in range(N)])
            residuals.append(feats - clean)
            # slot j+1 is R @ slot j up to the noise of both slots
            assert (feats[1:] - feats[:-1] @ R.T).abs().max() < 8 * NOISE_STD
            if with_pixels:
                want = torch.tanh(st.pixel_map @ U[c]).reshape(3, spec.pixel_size, -1)
                assert torch.allclose(s["pixels"][img], want)
        if with_pixels:
            assert s["pixels"].shape == (spec.images_per_sample, 3, 16, 16)
    res = torch.cat(residuals)
    assert abs(res.std().item() - NOISE_STD) < 0.01 and abs(res.mean().item()) < 0.01
    feats = torch.cat([s["features"] for s in synthetic_samples(spec)])
    assert 0.6 < feats.std().item() < 1.5  # per-element scale ~1


@pytest.mark.parametrize("field,value", [("num_samples", 0), ("base_vocab", 4),
                                         ("seq_length", 10), ("images_per_sample", -1),
                                         ("visual_dim", 0), ("with_pixels", 1)])
def test_synthetic_spec_validation(field, value):
    with pytest.raises(ValueError, match=f"SyntheticSpec.{field}"):
        _spec(**{field: value})


def test_synthetic_text_only():
    s = synthetic_samples(_spec(images_per_sample=0, num_samples=3))
    assert all(x["features"].shape == (0, D) and (x["modality"] == TEXT).all() for x in s)


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("feature_dtype,with_pixels", [("float32", False), ("float16", True)])
def test_write_open_round_trip(tmp_path, feature_dtype, with_pixels):
    spec = _spec(num_samples=23, with_pixels=with_pixels)
    samples = synthetic_samples(spec)
    index_path = write_dataset(samples, str(tmp_path), shard_size=5, feature_dtype=feature_dtype,
                               **DIMS)
    index = json.loads(open(index_path).read())
    assert index["format"] == FORMAT and index["num_samples"] == 23
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["has_pixels"] is with_pixels
    assert index["pixel_shape"] == ([3, 16, 16] if with_pixels else None)
    assert sum(s["slots"] for s in index["shards"]) == 23 * 2 * N
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temp leftovers
    ds = UMMDataset.open(str(tmp_path), **DIMS)
    assert len(ds) == 23 and ds.has_pixels is with_pixels
    cast = torch.float16 if feature_dtype == "float16" else torch.float32
    _assert_samples_equal([ds[i] for i in range(len(ds))], samples, cast)
    _assert_samples_equal([ds[-1]], samples[-1:], cast)
    ds.validate_all()
    with pytest.raises(IndexError):
        ds[23]


def test_write_synthetic_and_from_samples(tmp_path):
    spec = _spec(num_samples=6)
    path = write_synthetic(spec, str(tmp_path / "syn"))
    ds = UMMDataset.open(path, **DIMS)  # the index path works as well as the directory
    mem = UMMDataset.from_samples(synthetic_samples(spec), **DIMS)
    _assert_samples_equal([ds[i] for i in range(6)], [mem[i] for i in range(6)])


def test_write_rejects_mixed_pixels_and_empty(tmp_path):
    a, b = _image_sample(), _image_sample()
    a["pixels"] = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="sample 1: lacks pixels"):
        write_dataset([a, b], str(tmp_path), **DIMS)
    with pytest.raises(ValueError, match="no samples"):
        write_dataset([], str(tmp_path), **DIMS)
    with pytest.raises(ValueError, match="feature_dtype"):
        write_dataset([b], str(tmp_path), feature_dtype="bfloat16", **DIMS)
    big = _image_sample()
    big["features"][0, 0] = 1e6
    with pytest.raises(ValueError, match="overflow"):
        write_dataset([big], str(tmp_path), **DIMS)


# ----------------------------------------------------------------------------- converter

def _jsonl_tree(tmp_path, lines, pixels=False):
    rng = np.random.default_rng(0)
    (tmp_path / "f").mkdir(exist_ok=True)
    arrays = {}
    for name in ("a", "b"):
        arrays[name] = rng.standard_normal((N, D)).astype(np.float32)
        np.save(tmp_path / "f" / f"{name}.npy", arrays[name])
        if pixels:
            arrays[name + "_pix"] = rng.standard_normal((3, 5, 5)).astype(np.float32)
            np.save(tmp_path / "f" / f"{name}_pix.npy", arrays[name + "_pix"])
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path), arrays


def test_convert_expected_content(tmp_path):
    lines = [{"segments": [{"tokens": [1, 2, 3]}, {"image": "f/a.npy"}, {"tokens": [4]}]},
             {"segments": [{"tokens": [63]}]},
             {"segments": [{"image": "f/b.npy"}, {"image": "f/a.npy"}, {"tokens": [0, 7]}]}]
    jsonl, arr = _jsonl_tree(tmp_path, lines)
    index = convert_jsonl(jsonl, str(tmp_path / "out"), feature_dtype="float32", shard_size=2,
                          **DIMS)
    ds = UMMDataset.open(os.path.dirname(index), **DIMS)
    img = [SP.img_start] + [SP.img_slot] * N + [SP.img_end]
    img_mod = [IMAGE] * (N + 1) + [TEXT]
    want = [([1, 2, 3] + img + [4], [0, 0, 0] + img_mod + [0], [arr["a"]]),
            ([63], [0], []),
            (img + img + [0, 7], img_mod + img_mod + [0, 0], [arr["b"], arr["a"]])]
    assert len(ds) == 3
    for i, (toks, mod, feats) in enumerate(want):
        s = ds[i]
        assert s["tokens"].tolist() == toks and s["modality"].tolist() == mod
        expect = np.concatenate(feats) if feats else np.zeros((0, D), np.float32)
        assert np.array_equal(s["features"].numpy(), expect)


def test_convert_pixels_and_cli(tmp_path, capsys):
    lines = [{"segments": [{"tokens": [1]}]},  # text-only line before the first image
             {"segments": [{"tokens": [2]}, {"image": "f/a.npy", "pixels": "f/a_pix.npy"}]}]
    jsonl, arr = _jsonl_tree(tmp_path, lines, pixels=True)
    out = str(tmp_path / "out")
    rc = convert_main(["--jsonl", jsonl, "--out", out, "--base-vocab", str(V), "--image-tokens",
                       str(N), "--visual-dim", str(D), "--feature-dtype", "float32"])
    assert rc == 0 and "wrote 2 samples" in capsys.readouterr().out
    ds = UMMDataset.open(out, **DIMS)
    assert ds[0]["pixels"].shape == (0, 3, 5, 5)
    assert torch.equal(ds[1]["pixels"][0], torch.from_numpy(arr["a_pix"]).half().float())
    rc = convert_main(["--jsonl", jsonl, "--out", out, "--base-vocab", "2", "--image-tokens",
                       str(N), "--visual-dim", str(D)])
    assert rc == 1 and "line 2 segment 0: token id 2" in capsys.readouterr().err
    assert len(UMMDataset.open(out, **DIMS)) == 2  # a failed conversion keeps the old dataset


def test_convert_cli_module_help():
    r = subprocess.run([sys.executable, "-m", "megalora.umm.convert", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--visual-dim" in r.stdout and "--feature-dtype" in r.stdout


@pytest.mark.parametrize("bad,exc,match", [
    ({"segments": [{"tokens": [1, 64]}]}, ValueError, r"line 2 segment 0: token id 64 .*vocab"),
    ({"segments": [{"image": "f/wrong.npy"}]}, ValueError,
     r"line 2 segment 0: image features have shape \[3, 16\]"),
    ({"segments": [{"image": "f/nope.npy"}]}, FileNotFoundError,
     r"line 2 segment 0: image file .*nope.npy"),
    ({"segments": [{"video": "f/a.npy"}]}, ValueError, r"line 2 segment 0: unknown segment"),
    ({"segments": [{"image": "f/a.npy", "caption": "x"}]}, ValueError,
     "line 2 segment 0: unknown segment"),
    ({"segs": []}, ValueError, "line 2: expected an object with a 'segments' list"),
    ("{not json", ValueError, "line 2: not valid JSON"),
])
def test_convert_errors_name_the_line(tmp_path, bad, exc, match):
    good = json.dumps({"segments": [{"tokens": [1]}, {"image": "f/a.npy"}]})
    jsonl, _ = _jsonl_tree(tmp_path, [good, bad if isinstance(bad, str) else json.dumps(bad)])
    np.save(tmp_path / "f" / "wrong.npy", np.zeros((3, D), np.float32))
    with pytest.raises(exc, match=match):
        convert_jsonl(jsonl, str(tmp_path / "out"), **DIMS)
    assert not os.path.exists(tmp_path / "out" / "index.json")  # nothing half-made is indexed


# ----------------------------------------------------------------------------- open errors

@pytest.fixture
def written(tmp_path):
    samples = [_image_sample(), _text_sample([1, 2, 3]), _image_sample(), _image_sample()]
    write_dataset(samples, str(tmp_path), shard_size=2, feature_dtype="float32", **DIMS)
    return tmp_path


def _index(d):
    return json.loads((d / "index.json").read_text())


def _tamper(d, shard, fn):
    """Rewrite a shard's tensors with ``fn`` and re-record its sha256 (so only content is bad)."""
    path = d / shard_name(shard)
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": "1"})
    index = _index(d)
    index["shards"][shard]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (d / "index.json").write_text(json.dumps(index))


def test_open_missing_files(written, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="no data index"):
        UMMDataset.open(str(tmp_path_factory.mktemp("empty")), **DIMS)
    os.unlink(written / shard_name(1))
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors.*does not exist"):
        UMMDataset.open(str(written), **DIMS)


@pytest.mark.parametrize("field,value", [("visual_dim", 1792), ("image_tokens", 64),
                                         ("base_vocab", 32000)])
def test_open_model_mismatch_names_config_field(written, field, value):
    dims = dict(DIMS, **{field: value})
    with pytest.raises(ValueError, match=rf"has {field}={DIMS[field]} but model.{field}={value}"):
        UMMDataset.open(str(written), **dims)


def test_open_bad_index(written):
    index = _index(written)
    (written / "index.json").write_text(json.dumps(dict(index, format="other")))
    with pytest.raises(ValueError, match="not a megalora-umm-data index"):
        UMMDataset.open(str(written), **DIMS)
    (written / "index.json").write_text(json.dumps(dict(index, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        UMMDataset.open(str(written), **DIMS)
    (written / "index.json").write_text(json.dumps(index)[:40])
    with pytest.raises(ValueError, match="not valid JSON"):
        UMMDataset.open(str(written), **DIMS)


def test_open_truncated_and_corrupt_shard(written):
    path = written / shard_name(0)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    for verify in (True, False):
        with pytest.raises(ValueError,
                           match="shard-00000.safetensors.*truncated or corrupt.*regenerate"):
            UMMDataset.open(str(written), verify=verify, **DIMS)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # inside the tensor data: the file still parses
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="shard-00000.safetensors.*sha256 mismatch"):
        UMMDataset.open(str(written), **DIMS)
    UMMDataset.open(str(written), verify=False, **DIMS)  # verify=False skips the hash


def _set_offsets(key, values):
    def fn(t):
        t[key] = torch.tensor(values, dtype=torch.int64)
    return fn


@pytest.mark.parametrize("fn,match", [
    (_set_offsets("sample_offsets", [0, 13, 10]), "sample_offsets out of range"),
    (_set_offsets("sample_offsets", [0, 20, 16]), "out of range"),
    (_set_offsets("slot_offsets", [0, 4, 2]), "slot_offsets out of range"),
    (lambda t: t.update(features=torch.zeros(8, D + 1)),
     r"features is F32 \[8, 17\].*model.visual_dim"),
    (lambda t: t.update(tokens=t["tokens"].long()), "tokens is I64"),
    (lambda t: t.pop("modality"), "lacks tensor 'modality'"),
])
def test_open_bad_shard_structure(written, fn, match):
    _tamper(written, 1, fn)
    with pytest.raises(ValueError, match="shard-00001.safetensors.*" + match):
        UMMDataset.open(str(written), **DIMS)


def test_open_offsets_not_monotonic(written):
    # shard 0 = image sample (11 tokens) + text sample (3 tokens): 14 in all
    _tamper(written, 0, _set_offsets("sample_offsets", [0, 15, 14]))
    with pytest.raises(ValueError, match="sample_offsets not monotonic"):
        UMMDataset.open(str(written), **DIMS)


@pytest.mark.parametrize("fn,match", [
    (lambda t: t["modality"].__setitem__(0, 5), "modality id 5 is not one of"),
    (lambda t: t["tokens"].__setitem__(0, V + 4), rf"token id {V + 4} is outside \[0, {V + 4}\)"),
    (lambda t: t["tokens"].__setitem__(4, 1), r"image span at position 3 is not \[IMG\] \+ 4"),
    (lambda t: t["modality"].__setitem__(3, 0),
     "modality ids inconsistent with tokens.*first at 3"),
    (lambda t: t["tokens"].__setitem__(12, SP.img_slot), "outside an image span"),
    (_set_offsets("slot_offsets", [0, 3, 4]), "3 feature rows but 4 <image> tokens"),
])
def test_read_bad_sample_names_shard_and_sample(written, fn, match):
    _tamper(written, 0, fn)
    ds = UMMDataset.open(str(written), **DIMS)
    with pytest.raises(ValueError, match=r"shard-00000.safetensors sample \d: .*" + match):
        for i in range(len(ds)):
            ds[i]


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(features=torch.zeros(N, D + 1)),
     r"features must be a float \[n_slots, 16\]"),
    (lambda s: s.update(features=torch.zeros(N - 1, D)), "3 feature rows but 4 <image> tokens"),
    (lambda s: s["modality"].__setitem__(0, 2), "modality id 2"),
    (lambda s: s["modality"].__setitem__(N + 4, IMAGE), r"token 66 has modality 1, expected 0"),
    (lambda s: s["tokens"].__setitem__(0, -1), "token id -1 is outside"),
    (lambda s: s.update(tokens=torch.cat([s["tokens"], torch.tensor([SP.pad])]),
                        modality=torch.cat([s["modality"], torch.tensor([TEXT])])),
     "expected -1"),
    (lambda s: s["features"].__setitem__((0, 0), float("nan")), "NaN or inf"),
    (lambda s: s.update(pixels=torch.zeros(2, 3, 4, 4)), r"pixels must be a \[n_images=1"),
    (lambda s: s.update(tokens=torch.zeros(0, dtype=torch.long)), "non-empty 1-D integer"),
])
def test_validate_sample_errors(edit, match):
    s = _image_sample()
    validate_sample(s, SP, N, D, where="x.safetensors sample 3")
    edit(s)
    with pytest.raises(ValueError, match="x.safetensors sample 3: .*" + match):
        validate_sample(s, SP, N, D, where="x.safetensors sample 3")
    with pytest.raises(ValueError, match="sample 1: .*" + match):
        UMMDataset.from_samples([_image_sample(), s], **DIMS)


def test_validate_pad_inside_sample_ok(tmp_path):
    """A [PAD] inside a sample (modality -1) is valid: accepted, written and read back as it is
    (the reader validates every sample again), and it is never a text target; labelled as text,
    or -1 on a text token, the sample is refused."""
    from megalora.umm.batch import collate

    s = _text_sample([1, SP.pad, 2])
    s["modality"][1] = PAD_MODALITY
    assert validate_sample(s, SP, N, D, where="s") is None
    write_dataset([s], str(tmp_path), **DIMS)
    back = UMMDataset.open(str(tmp_path), **DIMS)[0]
    assert back["tokens"].tolist() == [1, SP.pad, 2]
    assert back["modality"].tolist() == [TEXT, PAD_MODALITY, TEXT]
    # targets: 1 -> [PAD] no, [PAD] -> 2 yes, 2 -> (padding) no, (padding) no
    assert collate([back], 4, SP).text_loss_mask[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    for pos, modality, expected in ((1, TEXT, PAD_MODALITY), (0, PAD_MODALITY, TEXT)):
        bad = {k: v.clone() for k, v in s.items()}
        bad["modality"][pos] = modality
        with pytest.raises(ValueError, match=f"s: .*first at {pos}: .*expected {expected}"):
            validate_sample(bad, SP, N, D, where="s")


# ----------------------------------------------------------------------------- stream

def _stream_ds(n=24):
    return UMMDataset.from_samples(synthetic_samples(_spec(num_samples=n, with_pixels=True)),
                                   **DIMS)


def _stream(ds, **kw):
    base = dict(micro_batch_size=3, seq_length=48, special=SP, seed=7)
    base.update(kw)
    return DataStream(ds, **base)


def test_stream_disjoint_and_covering_across_ranks():
    ds = _stream_ds(24)
    streams = [_stream(ds, dp_rank=r, dp_size=4) for r in range(4)]
    assert streams[0].steps_per_epoch == 2
    for epoch in range(2):
        seen = [i for s in streams for _ in range(2) for i in s.next_indices()]
        assert sorted(seen) == list(range(24)), f"epoch {epoch}"
    orders = [streams[0].epoch_order(e) for e in range(2)]
    assert not torch.equal(orders[0], orders[1])  # epochs reshuffle
    assert torch.equal(_stream(ds, shuffle=False).epoch_order(0), torch.arange(24))


def test_stream_drops_remainder_and_is_deterministic():
    ds = _stream_ds(10)  # global batch 6: one step per epoch, 4 samples skipped each epoch
    a, b = _stream(ds, dp_size=2), _stream(ds, dp_size=2)
    other = _stream(ds, dp_size=2, dp_rank=1)
    first = [a.next_indices() for _ in range(3)]
    assert first == [b.next_indices() for _ in range(3)]
    assert len(set(first[0] + other.next_indices())) == 6
    assert a.epoch == 2 and first[1] == a.epoch_order(1)[:3].tolist()
    assert _stream(ds, seed=8).epoch_order(0).tolist() != a.epoch_order(0).tolist()


def _batches_equal(x: UMMBatch, y: UMMBatch):
    for name in ("tokens", "modality", "text_labels", "text_loss_mask", "image_in_mask",
                 "image_target_mask", "features", "pixels"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_stream_exact_resume(tmp_path):
    write_synthetic(_spec(num_samples=20, with_pixels=True), str(tmp_path))
    ds = UMMDataset.open(str(tmp_path), **DIMS)
    ref = _stream(ds, dp_rank=1, dp_size=2)
    for _ in range(5):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON round trip
    expected = [ref.next_batch() for _ in range(7)]  # crosses an epoch boundary (3 steps/epoch)
    resumed = _stream(UMMDataset.open(str(tmp_path), **DIMS), dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for x, y in zip(expected, [resumed.next_batch() for _ in range(7)]):
        _batches_equal(x, y)
    assert resumed.state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="seed=7 but this stream has seed=8"):
        _stream(ds, dp_size=2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple"):
        _stream(ds, micro_batch_size=4).load_state_dict(dict(state, position=6))


def test_stream_errors():
    ds = _stream_ds(10)
    with pytest.raises(ValueError, match=r"10 samples but one global batch .* = 12"):
        _stream(ds, micro_batch_size=3, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        _stream(ds, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        _stream(ds, micro_batch_size=0)


def test_stream_batches_have_consistent_masks():
    ds = _stream_ds(12)
    stream = _stream(ds, micro_batch_size=4, seq_length=64)
    for _ in range(4):
        idx_state = stream.state_dict()
        batch = stream.next_batch()
        probe = _stream(ds, micro_batch_size=4, seq_length=64)
        probe.load_state_dict(idx_state)
        samples = [ds[i] for i in probe.next_indices()]
        t = batch.tokens
        assert t.shape == (4, 64)
        assert torch.equal(batch.image_in_mask, t == SP.img_slot)
        assert torch.equal(batch.image_target_mask[:, :-1], t[:, 1:] == SP.img_slot)
        assert not batch.image_target_mask[:, -1].any()
        assert torch.equal(batch.text_loss_mask.bool()[:, :-1], t[:, 1:] < V)
        assert torch.equal(batch.modality == PAD_MODALITY, t == SP.pad)
        # [IMG] and the first N-1 slots regress, i.e. every image span has N targets
        assert batch.num_image_targets == batch.features.shape[0] == int((t == SP.img_slot).sum())
        assert torch.equal(batch.features, torch.cat([s["features"] for s in samples]))
        assert torch.equal(batch.pixels, torch.cat([s["pixels"] for s in samples]))
        for row, s in zip(t, samples):
            n = s["tokens"].numel()
            assert torch.equal(row[:n], s["tokens"]) and (row[n:] == SP.pad).all()
