"""The wheels the GPU check carries (``launch/gpu_wheels.txt``): download them, and check that
they, with what the GPU image already holds, cover megalora's needs and each other's.

    python -m megalora.bench.wheels .whl     # make gpu-wheels: download into .whl/
    python -m megalora.bench.wheels --check  # resolve into a temporary folder and check

Wheels are for CPython 3.12 on x86-64 manylinux (the GPU image's Python), never this machine's.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEEL_LIST = os.path.join(ROOT, "launch", "gpu_wheels.txt")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    a for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                  "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", tag)]
# What the GPU image ('cuda') holds, as KINDS.md of the device tool read it on 2026-11-17
# (the packages megalora, its tests and the carried wheels could need; names normalised).
IMAGE_PACKAGES = frozenset("""
torch triton numpy packaging safetensors pyyaml tqdm tensorboard scipy matplotlib pytest
hypothesis pillow scikit-learn joblib threadpoolctl transformers peft setuptools wheel
typing-extensions filelock sympy networkx jinja2 fsspec rich einops ninja pybind11 psutil
mpi4py protobuf
""".split())


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_list(path: str = WHEEL_LIST) -> List[Tuple[str, str, bool]]:
    """(name, version, build from source) for each line of the wheel list."""
    pins = []
    for raw in open(path):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        spec, *flags = line.split()
        if "==" not in spec or flags not in ([], ["build"]):
            raise ValueError(f"{path}: {raw.strip()!r}: expected NAME==VERSION [build]")
        name, version = spec.split("==")
        pins.append((_norm(name), version, flags == ["build"]))
    names = [p[0] for p in pins]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: more than one version of {dupes}: keep one (two stop the "
                         "whole install there)")
    return pins


def download(dest: str, path: str = WHEEL_LIST) -> List[str]:
    """Fetch (or build, for ``build`` lines) every listed wheel into ``dest``."""
    os.makedirs(dest, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    for name, version, build in read_list(path):
        cmd = (pip + ["wheel", "--no-deps", "-w", dest] if build
               else pip + ["download", "--no-deps", *PLATFORM, "-d", dest])
        subprocess.run(cmd + [f"{name}=={version}"], check=True, timeout=600)
    return sorted(glob.glob(os.path.join(dest, "*.whl")))


def _requires(wheel: str) -> List[str]:
    """The wheel's unconditional requirements on Python 3.12 / Linux (names)."""
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": "",
           "implementation_name": "cpython", "os_name": "posix"}
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(_norm(req.name))
    return out


def problems(wheels: List[str], path: str = WHEEL_LIST) -> List[str]:
    """What the carried wheels and the image leave uncovered (empty: nothing)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = {n: v for n, v, _ in read_list(path)}
    found: Dict[str, str] = {}
    for wheel in wheels:
        name, version = os.path.basename(wheel).split("-")[:2]
        found[_norm(name)] = version
    out = [f"{n}=={v} listed but no wheel was fetched" for n, v in pins.items()
           if found.get(n) != v]
    out += [f"{os.path.basename(w)} is not for cp312 x86-64" for w in wheels
            if not any(t in w for t in ("cp312", "py3-none-any", "abi3"))]
    ours = [_norm(Requirement(r).name) for r in metadata.requires("megalora") or []
            if "extra ==" not in r]
    needed = {"megalora": ours, **{os.path.basename(w): _requires(w) for w in wheels}}
    for who, names in needed.items():
        out += [f"{who} needs {n}: neither carried nor on the GPU image; add it to {path}"
                for n in names if n not in pins and n not in IMAGE_PACKAGES]
    return out


def check_wheels(download_dir: str = "") -> List[str]:
    """Resolve the list into ``download_dir`` (a temporary folder by default) and check it."""
    try:
        if not download_dir:
            with tempfile.TemporaryDirectory() as tmp:
                return problems(download(tmp))
        return problems(download(download_dir))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as exc:
        return [f"the wheel list does not resolve: {exc}"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"] or not argv:
        found = check_wheels()
    else:
        found = check_wheels(argv[0])
    for line in found:
        print("megalora wheels:", line)
    print("megalora wheels: " + ("ok" if not found else f"{len(found)} problem(s)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
