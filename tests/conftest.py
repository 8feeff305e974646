"""Shared fixtures: an in-process world-1 gloo group with megatron's parallel state (TP=PP=1);
EmojiCap built once per session (``built``).

Multi-rank tests spawn their own gloo worlds with ``megalora.testing.dist.run_distributed``.
"""

import os
import warnings

import pytest
import torch

# Triton kernels run through the CPU interpreter when there is no GPU. It must be chosen before
# any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session")
def megatron_world1():
    """torch.distributed (gloo, world 1) + megatron parallel_state, inside cpu_megatron()."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megalora.cpu import cpu_megatron
    from megalora.distributed import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel()
    with cpu_megatron():
        yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """EmojiCap from the real Debian packages, English and German captions: (EmojiCapConfig,
    manifest, the unpacked packages' root). The packages are fetched with apt-get; without
    the archive the tests that need it skip, except in CI (MEGALORA_REQUIRE_DEBIAN=1), where
    they fail."""
    from helpers import requirement
    from megalora.umm import emojicap

    cache = os.environ.get("MEGALORA_DEB_CACHE") or os.path.expanduser("~/.cache/megalora/debian")
    try:
        emojicap.fetch_sources(cache)
    except Exception as exc:  # no apt-get, no archive
        requirement("debian", f"the packages could not be fetched: {exc}")
    out = tmp_path_factory.mktemp("emojicap")
    cfg = emojicap.EmojiCapConfig(out=str(out), cache=cache, languages=("en", "de"))
    return cfg, emojicap.build(cfg, progress=lambda m: None), os.path.join(cache, "root")
