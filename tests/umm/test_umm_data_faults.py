"""UMM data under faults: a failing conversion keeps the old dataset, foreign output
directories are refused, an interrupted swap is recoverable, files get the umask's mode, broken
indexes and over-long samples are named before training."""

import errno
import json
import os
import stat

import pytest
import torch

from megalora.umm.convert import convert_jsonl, main as convert_main
from megalora.umm.data import DataStream, UMMDataset, shard_name, write_dataset
from megalora.umm.tokens import SpecialTokens

V, N, D = 64, 4, 16  # base_vocab, image_tokens, visual_dim
SP = SpecialTokens(V)
DIMS = dict(base_vocab=V, image_tokens=N, visual_dim=D)
REPLACED = ".replaced"  # where a swap puts the old dataset aside (megalora.umm.dataset_dir)


def _text(toks):
    t = torch.tensor(toks)
    return {"tokens": t, "modality": torch.zeros_like(t), "features": torch.zeros(0, D)}


def _snapshot(directory):
    """name -> bytes of every file in ``directory``."""
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def _siblings(directory):
    return sorted(n for n in os.listdir(directory.parent) if n != directory.name)


@pytest.fixture
def old(tmp_path):
    """A 3-shard dataset of 3 one-token samples in tmp_path/data/ds, and its files' bytes."""
    out = tmp_path / "data" / "ds"
    write_dataset([_text([i]) for i in (1, 2, 3)], str(out), shard_size=1, **DIMS)
    return out, _snapshot(out)


def _assert_old_intact(out, snapshot):
    assert _snapshot(out) == snapshot  # byte-identical, nothing added or removed
    assert _siblings(out) == []  # no staging or aside directory left behind
    ds = UMMDataset.open(str(out), **DIMS)
    assert [ds[i]["tokens"].tolist() for i in range(len(ds))] == [[1], [2], [3]]


# ----------------------------------------------------------------------------- failing writes

def _jsonl(tmp_path, lines):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_failed_conversion_keeps_old_dataset(old, tmp_path, capsys):
    out, snapshot = old
    # Lines 1-2 convert (and, with one sample per shard, are written) before line 3 fails.
    jsonl = _jsonl(tmp_path, [{"segments": [{"tokens": [7]}]}, {"segments": [{"tokens": [8]}]},
                              {"segments": [{"tokens": [V]}]}])
    with pytest.raises(ValueError, match="line 3 segment 0: token id 64"):
        convert_jsonl(jsonl, str(out), shard_size=1, **DIMS)
    _assert_old_intact(out, snapshot)
    rc = convert_main(["--jsonl", jsonl, "--out", str(out), "--base-vocab", str(V),
                       "--image-tokens", str(N), "--visual-dim", str(D), "--shard-size", "1"])
    assert rc == 1 and "line 3 segment 0" in capsys.readouterr().err
    _assert_old_intact(out, snapshot)


def test_disk_full_keeps_old_dataset(old, monkeypatch):
    import safetensors.torch

    out, snapshot = old
    real, calls = safetensors.torch.save_file, []

    def save_file(*args, **kw):  # the second shard hits a full disk
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError, match="No space left"):
        write_dataset([_text([9]), _text([10]), _text([11])], str(out), shard_size=1, **DIMS)
    monkeypatch.undo()
    _assert_old_intact(out, snapshot)


def test_interrupt_keeps_old_dataset(old):
    out, snapshot = old

    def samples():
        yield _text([9])
        yield _text([10])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(samples(), str(out), shard_size=1, **DIMS)
    _assert_old_intact(out, snapshot)


def test_failed_swap_rolls_back(old, monkeypatch):
    out, snapshot = old
    real, calls = os.rename, []

    def rename(src, dst):  # the old dataset moves aside, then moving the new one in fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        write_dataset([_text([9])], str(out), **DIMS)
    monkeypatch.undo()
    _assert_old_intact(out, snapshot)


def test_replacing_leaves_only_the_new_dataset(old):
    out, _ = old
    write_dataset([_text([5, 6])], str(out), **DIMS)  # one shard replaces three
    assert sorted(os.listdir(out)) == ["index.json", shard_name(0)] and _siblings(out) == []
    ds = UMMDataset.open(str(out), **DIMS)
    assert len(ds) == 1 and ds[0]["tokens"].tolist() == [5, 6]


def test_refuses_output_that_is_not_a_dataset(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "index.json").write_text(json.dumps({"format": "someone-else"}))
    with pytest.raises(ValueError, match=r"not a megalora dataset.*'index.json', 'notes.txt'.*"
                                         r"Choose a new or empty directory"):
        write_dataset([_text([1])], str(mine), **DIMS)
    assert (mine / "notes.txt").read_text() == "keep me" and _siblings(mine) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        write_dataset([_text([1])], str(tmp_path / "afile"), **DIMS)
    jsonl = _jsonl(tmp_path, [{"segments": [{"tokens": [1]}]}])
    rc = convert_main(["--jsonl", jsonl, "--out", str(mine), "--base-vocab", str(V),
                       "--image-tokens", str(N), "--visual-dim", str(D)])
    assert rc == 1 and "not a megalora dataset" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["index.json", "notes.txt"]


def test_interrupted_swap_is_named_and_recovered(old):
    out, snapshot = old
    aside = out.parent / (out.name + REPLACED)
    os.rename(out, aside)  # the state a crash between the swap's two renames leaves
    with pytest.raises(FileNotFoundError, match=rf"interrupted while swapping.*{aside.name}"):
        UMMDataset.open(str(out), **DIMS)

    def failing():
        yield _text([9])
        raise ValueError("bad sample")

    with pytest.raises(ValueError, match="bad sample"):
        write_dataset(failing(), str(out), **DIMS)
    _assert_old_intact(out, snapshot)  # the next write put the old dataset back first
    os.rename(out, aside)
    write_dataset([_text([4])], str(out), **DIMS)
    assert UMMDataset.open(str(out), **DIMS)[0]["tokens"].tolist() == [4]
    assert _siblings(out) == []


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                      (0o027, 0o640, 0o750)])
def test_dataset_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    saved = os.umask(umask)
    try:
        for _ in range(2):  # a new directory, then the replacement of an existing dataset
            write_dataset([_text([1]), _text([2])], str(tmp_path / "ds"), shard_size=1, **DIMS)
            assert stat.S_IMODE(os.stat(tmp_path / "ds").st_mode) == dir_mode
            for name in os.listdir(tmp_path / "ds"):
                assert stat.S_IMODE(os.stat(tmp_path / "ds" / name).st_mode) == file_mode, name
    finally:
        os.umask(saved)


# ----------------------------------------------------------------------------- broken index

def _shard0(**changes):
    """Edit shard 0's index entry (a key set to None is removed); the other entries stay."""
    def edit(index):
        entry = {k: v for k, v in dict(index["shards"][0], **changes).items() if v is not None}
        return dict(index, shards=[entry] + index["shards"][1:])
    return edit


@pytest.mark.parametrize("edit,match", [
    (lambda ix: {k: v for k, v in ix.items() if k != "shards"}, r"lacks 'shards'"),
    (lambda ix: {k: v for k, v in ix.items() if k != "has_pixels"}, r"lacks 'has_pixels'"),
    (lambda ix: {k: v for k, v in ix.items() if k != "num_samples"}, r"lacks 'num_samples'"),
    (_shard0(file=None), r"shards\[0\] needs 'file' as a str, got None"),
    (_shard0(file="../ds/shard-00000.safetensors"), r"shards\[0\] file '../ds/shard-00000"
                                                    r".safetensors' is not a file name inside"),
    (lambda ix: dict(ix, shards=[s["file"] for s in ix["shards"]]),
     r"shards\[0\] needs 'file' as a str, got None"),
    (lambda ix: dict(ix, shards="shard-00000.safetensors"), r"'shards' is str"),
    (lambda ix: dict(ix, version="1"), r"'version' is str '1' but must be int"),
    (lambda ix: [ix], r"holds a JSON list, not an object"),
])
def test_broken_index_names_file_field_and_fix(old, edit, match):
    out, _ = old
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(edit(index)))
    with pytest.raises(ValueError, match=r"index.json.*" + match + r".*regenerate the dataset"):
        UMMDataset.open(str(out), **DIMS)


@pytest.mark.parametrize("content", [b'{"format": "megalora-umm-data", "shar', b"\xff\xfe\x00"])
def test_unreadable_index_names_file(old, content):
    out, _ = old
    (out / "index.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"index.json' is not valid JSON.*regenerate the dataset"):
        UMMDataset.open(str(out), **DIMS)


# ----------------------------------------------------------------------------- sequence length

def test_long_sample_found_when_the_stream_is_made(tmp_path, monkeypatch):
    samples = [_text([1, 2]), _text([3]), _text([4]), _text(list(range(11))), _text([5, 6, 7])]
    write_dataset(samples, str(tmp_path / "ds"), shard_size=2, **DIMS)
    ds = UMMDataset.open(str(tmp_path / "ds"), **DIMS)
    # The lengths come from the shards' offsets: no sample is read to check them.
    monkeypatch.setattr(UMMDataset, "__getitem__", lambda self, i: pytest.fail("read a sample"))
    with pytest.raises(ValueError, match=r"1 sample\(s\) are longer than data.seq_length=10; the "
                                         r"first is sample 3 \(shard-00001.safetensors sample 1 "
                                         r"of '.*ds/index.json'\) with 11 tokens.*Raise "
                                         r"data.seq_length .* to at least 11.*drop or split"):
        DataStream(ds, micro_batch_size=1, seq_length=10, special=SP)
    DataStream(ds, micro_batch_size=1, seq_length=11, special=SP)  # fits exactly
    mem = UMMDataset.from_samples([_text([1]), _text(list(range(12)))], **DIMS)
    with pytest.raises(ValueError, match=r"sample 1 of the in-memory dataset with 12 tokens"):
        DataStream(mem, micro_batch_size=1, seq_length=10, special=SP)


def test_converter_max_tokens_matches_the_hint(tmp_path):
    # The hint's --max-tokens rejects at conversion what the stream would refuse.
    jsonl = _jsonl(tmp_path, [{"segments": [{"tokens": list(range(11))}]}])
    with pytest.raises(ValueError, match="line 1: 11 tokens exceed --max-tokens 10"):
        convert_jsonl(jsonl, str(tmp_path / "ds"), max_tokens=10, **DIMS)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no dataset, no staging directory
