"""MARS on a dataset directory (EmojiCap-style data rather than synthetic samples): the data
size D of its laws is the dataset's; a probe trains on ``data.max_samples`` of it (nested
subsets, the held-out set untouched); rank-search asks for a held-out dataset."""

import pytest
import torch

from megalora.umm.config import RunConfig
from megalora.umm.synthetic import SyntheticSpec, synthetic_samples

DIMS = dict(base_vocab=64, image_tokens=4, visual_dim=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from megalora.umm.data import write_dataset

    out = tmp_path_factory.mktemp("ds")
    spec = SyntheticSpec(num_samples=40, seq_length=32, seed=3, with_pixels=True, pixel_size=16,
                         **DIMS)
    write_dataset(synthetic_samples(spec), str(out / "train"), **DIMS)
    write_dataset(synthetic_samples(SyntheticSpec(**{**spec.__dict__, "num_samples": 8,
                                                     "seed": 4})), str(out / "test"), **DIMS)
    return out


def _run(dataset, *extra):
    return RunConfig.from_yaml("umm_tiny", [
        "model.base_vocab=64", "model.image_tokens=4", "model.visual_dim=16",
        "data.seq_length=32", f"data.path={dataset}/train", f"data.eval_path={dataset}/test",
        "vision.enabled=true", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        *extra])


def _key(sample):
    return tuple(sample["tokens"].tolist()) + tuple(sample["features"].flatten().tolist())


def test_max_samples_trains_on_a_seeded_nested_subset(dataset):
    from megalora.umm.session import build_datasets

    full, held = build_datasets(_run(dataset))
    every = {_key(full[i]) for i in range(len(full))}
    assert len(full) == 40 and len(every) == 40 and len(held) == 8
    small, held_small = build_datasets(_run(dataset, "data.max_samples=10"))
    large, _ = build_datasets(_run(dataset, "data.max_samples=25"))
    other, _ = build_datasets(_run(dataset, "data.max_samples=10", "data.seed=1"))
    keys = [[_key(d[i]) for i in range(len(d))] for d in (small, large, other)]
    assert [len(k) for k in keys] == [10, 25, 10]
    assert set(keys[1]) <= every and len(set(keys[1])) == 25  # distinct samples of the dataset
    assert keys[1][:10] == keys[0]  # nested: a smaller probe's data is part of a larger one's
    assert set(keys[2]) != set(keys[0])  # another seed, another subset
    assert torch.equal(small[0]["pixels"], large[0]["pixels"])  # pixels travel with samples
    assert [_key(held_small[i]) for i in range(8)] == [_key(held[i]) for i in range(8)]


def test_max_samples_errors(dataset):
    from megalora.errors import UsageError
    from megalora.umm.session import build_datasets

    with pytest.raises(UsageError, match="data.max_samples=41 but .* holds 40 samples"):
        build_datasets(_run(dataset, "data.max_samples=41"))
    with pytest.raises(ValueError, match="data.max_samples must be an int >= 0"):
        _run(dataset, "data.max_samples=-1")


def test_probes_size_their_data_from_the_dataset(dataset):
    from megalora.mars.cli import check_base
    from megalora.mars.probes import data_size, probe_overrides
    from megalora.mars.search import rank_config

    base = _run(dataset).to_dict()
    assert data_size(base) == 40
    probe = probe_overrides(base, 2, 4, 16, 6, "/tmp/p")
    assert probe["data"]["max_samples"] == 16 and probe["data"]["path"] == base["data"]["path"]
    assert probe["data"]["synthetic_samples"] == base["data"]["synthetic_samples"]
    assert rank_config(base, 2, 4)["data"] == base["data"]  # the full run: the whole dataset
    capped = _run(dataset, "data.max_samples=30").to_dict()
    assert data_size(capped) == 30
    assert rank_config(capped, 2, 4)["data"]["max_samples"] == 30
    check_base(RunConfig.from_dict(base))
    no_held_out = RunConfig.from_dict({**base, "data": {**base["data"], "eval_path": None}})
    with pytest.raises(ValueError, match="with data.path set data.eval_path too"):
        check_base(no_held_out)
