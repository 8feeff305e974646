"""The run directory (``train.out_dir``): one writer at a time, checked before the first step,
tidied after a kill, and an earlier run's checkpoints kept apart from this one's.

Global rank 0 calls ``claim`` once, before training:

- **Lock.** A POSIX lock (``fcntl.lockf``) on ``out_dir/.megalora.lock`` held for the whole run.
  A second run on the same directory (a restart while the first one's workers still train, two
  jobs given the same out_dir) stops at once, saying which host and pid hold it. The kernel
  drops the lock when the holder dies, whatever kills it. Filesystems without POSIX locks
  (some Lustre mounts) get a warning, and the run goes on unlocked.
- **Writable.** The lock file is written, so an out_dir that cannot be written fails here,
  not at the first checkpoint after the steps are lost.
- **Tidy.** ``checkpoints/*.partial`` step directories and ``.tmp-*`` files that a kill left
  half-written are removed (under the lock nobody else can be writing them). They never
  affected a resume; they only take space.
- **Fresh start.** A run that starts from scratch (``train.resume=false``, or nothing to resume)
  in an out_dir that holds an earlier run's checkpoints moves them to
  ``checkpoints.before-<time>/`` (nothing is deleted) so that this run's pruning and ``latest``
  see this run's checkpoints only.
"""

from __future__ import annotations

import datetime
import errno
import glob
import logging
import os
import shutil
import socket
from typing import List, Optional

from megalora.errors import UsageError

logger = logging.getLogger("megalora")
LOCK_FILE = ".megalora.lock"


class RunDirLock:
    """The held lock; ``release()`` (or process exit) frees it."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _lock(out_dir: str) -> RunDirLock:
    import fcntl

    path = os.path.join(out_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UsageError(f"train.out_dir={out_dir!r} is not writable ({exc.strerror}): choose "
                         "a directory this job can write, or fix its permissions") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # held by another process
            raise UsageError(f"train.out_dir={out_dir!r} is in use by another run ({holder}); "
                             "wait for it to end or stop it, or give this run another "
                             "train.out_dir") from None
        logger.warning("megalora: no lock on %s (%s): the filesystem has no POSIX locks; do "
                       "not start two runs on this out_dir", path, exc.strerror)
        return RunDirLock(path, None)
    stamp = f"host {socket.gethostname()} pid {os.getpid()} since " \
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"train.out_dir={out_dir!r} is not writable ({exc.strerror}, e.g. a "
                         "full disk): free space or choose another train.out_dir") from None
    return RunDirLock(path, fd)


def tidy(out_dir: str) -> List[str]:
    """Remove what an interrupted save left behind; returns the removed paths."""
    root = os.path.join(out_dir, "checkpoints")
    leftovers = glob.glob(os.path.join(root, "*.partial")) + \
        glob.glob(os.path.join(root, ".tmp-*")) + glob.glob(os.path.join(out_dir, ".tmp-*"))
    for path in leftovers:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return leftovers


def set_aside(out_dir: str) -> Optional[str]:
    """Move an earlier run's checkpoints out of the way (see the module docstring); returns
    the new directory, or None when there was nothing to move."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root) or not any(n.startswith("step_") or n == "latest"
                                          for n in os.listdir(root)):
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(out_dir, f"checkpoints.before-{stamp}")
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(out_dir, f"checkpoints.before-{stamp}-{n}")
    os.replace(root, target)
    return target


def claim(out_dir: str, fresh: bool) -> RunDirLock:
    """Lock, check and tidy ``out_dir`` (rank 0, once, before training). ``fresh``: this run
    starts from scratch, so an earlier run's checkpoints are set aside."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create train.out_dir={out_dir!r} ({exc.strerror}): choose a "
                         "directory this job can write") from None
    lock = _lock(out_dir)
    try:
        removed = tidy(out_dir)
        if removed:
            logger.info("megalora: removed %d leftover(s) of an interrupted save: %s",
                        len(removed), ", ".join(os.path.basename(p) for p in removed))
        moved = set_aside(out_dir) if fresh else None
        if moved:
            logger.warning("megalora: train.out_dir held an earlier run's checkpoints; this "
                           "run starts afresh, so they were moved to %s", moved)
    except BaseException:
        lock.release()
        raise
    return lock
