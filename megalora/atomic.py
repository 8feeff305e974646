"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The content goes to a temporary file in the same directory, is fsynced, renamed over the
target, and the directory is fsynced so the rename survives a crash; on any error the temporary
file is removed. Used by adapter files, UMM checkpoints, datasets and exports.

The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask):
``mkstemp`` creates 0600, which on a shared cluster keeps colleagues from reading an adapter.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (no thread reads it between)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` fills a temporary file that then replaces ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after: some writers (safetensors) recreate the file
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """``atomic_write`` of a bytes payload."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def atomic_savefig(fig, path: str, **kwargs) -> None:
    """``fig.savefig(path)`` atomically (matplotlib's format from ``path``'s suffix)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or None
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
