"""The GPU check's CPU-side pieces (``make gpu-check``; CI also runs its dry run): the wheel
list's coverage check finds what is missing, the tile pin is parsed and honoured, the summary
renders the CSVs."""

import zipfile

import pytest

from megalora.bench import wheels
from megalora.bench.summary import Outcome, write_summary


def _wheel(folder, name, version, requires, tag="cp312-cp312-manylinux_2_28_x86_64"):
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name, version)
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return str(path)


def test_wheel_coverage_names_what_is_missing(tmp_path):
    listing = tmp_path / "wheels.txt"
    listing.write_text("# comment\nalpha==1.0\nbeta==2.0  build\nmegatron-core==0.16.1\n"
                       "python-hostlist==2.3.0 build\n")
    found = [_wheel(tmp_path, "alpha", "1.0",
                    ["numpy", "gamma>=1", 'delta; python_version < "3.10"',
                     'extra-thing; extra == "dev"', "beta"]),
             _wheel(tmp_path, "megatron-core", "0.16.1", ["torch>=2.6.0", "numpy"]),
             _wheel(tmp_path, "python-hostlist", "2.3.0", [], tag="py3-none-any"),
             _wheel(tmp_path, "epsilon", "1.0", [], tag="cp311-cp311-manylinux_2_28_x86_64")]
    problems = wheels.problems(found, str(listing))
    # numpy is on the image, delta's marker is false on 3.12, extras are not needed, beta is
    # listed (though not fetched: reported once as such), gamma is nowhere
    assert sorted(problems) == sorted([
        "beta==2.0 listed but no wheel was fetched",
        "epsilon-1.0-cp311-cp311-manylinux_2_28_x86_64.whl is not for cp312 x86-64",
        f"alpha-1.0-cp312-cp312-manylinux_2_28_x86_64.whl needs gamma: neither carried nor on "
        f"the GPU image; add it to {listing}"]), problems


def test_megalora_requirements_must_be_covered(tmp_path):
    listing = tmp_path / "wheels.txt"
    listing.write_text("python-hostlist==2.3.0 build\n")  # megatron-core forgotten
    found = [_wheel(tmp_path, "python-hostlist", "2.3.0", [], tag="py3-none-any")]
    assert wheels.problems(found, str(listing)) == [
        f"megalora needs megatron-core: neither carried nor on the GPU image; add it to "
        f"{listing}"]


@pytest.mark.parametrize("text, message", [
    ("alpha==1\nalpha==2\n", "more than one version of \\['alpha'\\]"),
    ("alpha>=1\n", "expected NAME==VERSION"),
    ("alpha==1 compile\n", "expected NAME==VERSION"),
])
def test_wheel_list_errors(tmp_path, text, message):
    listing = tmp_path / "wheels.txt"
    listing.write_text(text)
    with pytest.raises(ValueError, match=message):
        wheels.read_list(str(listing))


def test_the_repository_wheel_list_reads():
    names = [n for n, _, _ in wheels.read_list()]
    assert "megatron-core" in names and len(names) == len(set(names))


def test_tile_pin(monkeypatch):
    from megalora.triton_kernels import common

    monkeypatch.setattr(common, "interpreting", lambda: False)  # the GPU path of block_sizes
    monkeypatch.delenv(common.BLOCKS_ENV, raising=False)
    assert common.block_sizes(8192, 4096) == (64, 128)
    monkeypatch.setenv(common.BLOCKS_ENV, "128x256")
    assert common.block_sizes(8192, 4096) == (128, 256)
    assert common.block_sizes(8192, 4096, wide=64) == (128, 128)  # fp32 tile kept <= 32 KB
    for bad in ("64", "64x100", "8x64", "axb"):
        monkeypatch.setenv(common.BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match="expected BMxBN with powers of two >= 16"):
            common.block_sizes(8192, 4096)


def test_summary_renders_status_and_tables(tmp_path):
    (tmp_path / "environment.json").write_text('{"nvidia_smi": "NVIDIA H200, 580, 143771 MiB",'
                                               ' "commit": "abc1234", "torch": "2.11.0"}')
    (tmp_path / "train.csv").write_text("config,variant,step_ms,tokens_per_s,extra\n"
                                        "umm_small.yaml,vanilla,12.5,650000,x\n")
    outcomes = [Outcome("kernels", "k", "ok", 61.2, None),
                Outcome("train", "t", "failed (exit 1)", 3.0, None)]
    text = open(write_summary(str(tmp_path), outcomes, 64.2, dry_run=False)).read()
    assert "- GPU: NVIDIA H200, 580, 143771 MiB" in text and "commit abc1234" in text
    assert "| kernels | ok | 61 | k |" in text and "| train | failed (exit 1) | 3 | t |" in text
    assert "| config | variant | step_ms | tokens_per_s |" in text  # only the known columns
    assert "| umm_small.yaml | vanilla | 12.5 | 650000 |" in text
    assert [o.ok for o in outcomes] == [True, False]
