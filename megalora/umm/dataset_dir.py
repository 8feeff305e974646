"""Build a dataset directory beside its destination and swap it in only once it is complete.

``staged_directory(out_dir, owned)`` yields a fresh sibling ``<out_dir>.partial-<pid>-<random>``
to write into. When the block finishes, the staging directory is fsynced and swapped in; when it
raises (a bad sample, a full disk, Ctrl-C), the staging directory is removed and ``out_dir`` is
left exactly as it was. A kill -9 while writing leaves only that ``.partial-`` sibling behind.

Swapping over an existing dataset takes two renames, ``out_dir -> <out_dir>.replaced`` and
``staging -> out_dir``, then deletes ``.replaced`` (POSIX has no portable atomic exchange of two
non-empty directories). A crash between the renames leaves no ``out_dir``, the old dataset
complete in ``.replaced`` and the new one complete in ``.partial-…``: ``interrupted_swap_hint``
says so to a reader, and the next ``staged_directory`` on the same path renames ``.replaced``
back before it starts, so the old dataset is never lost.

``owned(path)`` says whether an entry of an existing ``out_dir`` is a file the writer makes;
anything else (a user's own files) makes the write refuse rather than delete it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Callable, Iterator

REPLACED = ".replaced"
STAGING = ".partial-"

logger = logging.getLogger(__name__)


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _foreign_entries(directory: str, owned: Callable[[str], bool]) -> list:
    return sorted(n for n in os.listdir(directory) if not owned(os.path.join(directory, n)))


def _check_destination(target: str, owned: Callable[[str], bool]) -> None:
    """Refuse a destination whose replacement would delete something the writer did not make."""
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"output {target!r} exists and is not a directory; choose a directory "
                         "path for the dataset (e.g. a new one)")
    if os.path.isdir(target):
        foreign = _foreign_entries(target, owned)
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ValueError(f"output directory {target!r} is not empty and is not a megalora "
                             f"dataset (it holds {shown}); writing the dataset would replace it. "
                             "Choose a new or empty directory, or move those files away")


def _recover_interrupted_swap(target: str, owned: Callable[[str], bool]) -> None:
    """Undo what a crash between the two renames of a swap left (see the module docstring)."""
    aside = target + REPLACED
    if not os.path.lexists(aside):
        return
    if not os.path.isdir(aside) or _foreign_entries(aside, owned):
        raise ValueError(f"{aside!r} exists and is not a dataset left by an interrupted write; "
                         f"the writer needs that name to replace {target!r}: move it away")
    if os.path.isdir(target) and os.listdir(target):
        # The swap completed and only the deletion of the old dataset was cut short.
        shutil.rmtree(aside)
        return
    logger.warning("restoring %s from %s: an earlier write was interrupted while swapping",
                   target, aside)
    os.replace(aside, target)  # rename(2) replaces a missing or empty directory in one step
    _fsync_dir(os.path.dirname(target))


def interrupted_swap_hint(target: str) -> str:
    """A sentence for a reader that finds no dataset at ``target`` after an interrupted swap."""
    target = os.path.realpath(target)
    aside = target + REPLACED
    if os.path.exists(target) or not os.path.isdir(aside):
        return ""
    return (f"; a write was interrupted while swapping datasets: the previous dataset is in "
            f"{aside!r} (rename it back to {target!r}, or rerun the conversion, which does so "
            f"first) and the new one may be complete in a {os.path.basename(target)}{STAGING}* "
            "directory beside it")


def _swap_in(staging: str, target: str) -> None:
    parent = os.path.dirname(target)
    if not os.path.isdir(target) or not os.listdir(target):
        os.replace(staging, target)  # nothing to keep: one atomic rename
    else:
        aside = target + REPLACED
        os.rename(target, aside)
        # A crash here leaves no `target`; `_recover_interrupted_swap` and
        # `interrupted_swap_hint` handle that state.
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _fsync_dir(parent)
        shutil.rmtree(aside, ignore_errors=True)  # a leftover is removed by the next write
    _fsync_dir(parent)


@contextlib.contextmanager
def staged_directory(out_dir: str, owned: Callable[[str], bool]) -> Iterator[str]:
    """Yield a staging directory that replaces ``out_dir`` when the block succeeds."""
    # A symlinked out_dir stays a symlink: the swap happens where it points.
    target = os.path.realpath(out_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _recover_interrupted_swap(target, owned)
    _check_destination(target, owned)
    prefix = f"{os.path.basename(target)}{STAGING}{os.getpid()}-"
    try:
        staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as exc:
        raise ValueError(f"cannot create a staging directory in {parent!r} ({exc}); the dataset "
                         f"is built beside {target!r} and swapped in when complete, so its "
                         "parent directory must be writable: choose another output path") from exc
    try:
        # mkdtemp makes 0700; the dataset gets the mode a plain mkdir would give
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        # Writers such as safetensors' save_file replace the file they are given with a new
        # 0600 one, whatever mode it had: set the mode a plain open() would give here, once.
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o666 & ~_umask())
        _fsync_dir(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
