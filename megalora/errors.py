"""Errors a user can fix, and how the ``megalora`` command reports them.

A user error (a bad config value, a missing file, a checkpoint that does not fit the run, a loss
that went NaN) is printed as one line that says what to change, once, not as a Python traceback
on every rank; a real bug keeps its traceback. ``megalora --verbose ...`` (or
``MEGALORA_VERBOSE=1``) prints the traceback for every error.

What counts as a user error (``is_user_error``):
- ``UsageError`` and its subclasses (``AgreedError``, ``NonFiniteError``,
  ``megalora.distributed.LaunchError``);
- ``ValueError``, ``TypeError``, ``FileNotFoundError``, ``PermissionError``, ... raised by
  megalora's own code (the innermost frame is in the package): these carry megalora's messages.
  The same types raised inside torch or megatron are bugs until shown otherwise.

Which rank prints. Errors raised the same way on every rank (config parsing, and everything
checked through ``agree``) are printed by global rank 0 only. ``agree`` is a collective check:
each rank runs a block; if it fails on any rank, every rank raises one ``AgreedError`` carrying
the failing ranks' messages, so no rank is left waiting in a collective and rank 0 can say what
went wrong on rank 5. Any other user error is printed by the rank that raised it, prefixed
with its rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator, Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_BUILTIN_USER_TYPES = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
                       IsADirectoryError, NotADirectoryError, FloatingPointError)


class UsageError(ValueError):
    """An error in what the user gave (config, files, launch): the message says what to change."""

    same_on_all_ranks = False
    """True when every rank raises it identically (only rank 0 prints it)."""


class AgreedError(UsageError, RuntimeError):
    """Raised on every rank by ``agree`` when the checked block failed on some rank."""

    same_on_all_ranks = True


class NonFiniteError(UsageError, FloatingPointError):
    """A loss or gradient became inf/nan (every rank agrees before raising it)."""

    same_on_all_ranks = True


def _raised_in_megalora(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and os.path.abspath(last).startswith(_PACKAGE_DIR + os.sep)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error the user can fix (see the module docstring)."""
    if isinstance(exc, UsageError):
        return True
    return isinstance(exc, _BUILTIN_USER_TYPES) and _raised_in_megalora(exc)


def verbose_requested(argv: Optional[list] = None) -> bool:
    """``--verbose`` anywhere on the command line, or MEGALORA_VERBOSE=1."""
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get("MEGALORA_VERBOSE", "0") not in ("", "0")


_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
         "Connection refused")


def lost_peer(exc: BaseException) -> Optional[str]:
    """One line for a collective that failed because another rank's process (or its host) is
    gone: gloo and the c10d store raise RuntimeError/DistBackendError with these socket
    errors. None for anything else."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(s in text for s in _LOST):
        return None
    first = next((line for line in text.splitlines() if line.strip()), text)
    return ("lost the connection to another rank: its process or its host died (see that "
            f"rank's log, or the scheduler's for a failed node); {first.strip()[:200]}")


def report(exc: BaseException, rank: int, verbose: bool, same_on_all_ranks: bool = False) -> int:
    """Print ``exc`` the way the command line should; returns the exit code (2 for a user
    error, 1 for a bug)."""
    user = is_user_error(exc)
    once = same_on_all_ranks or getattr(exc, "same_on_all_ranks", False)
    if once and rank != 0 and not verbose:
        return 2 if user else 1
    prefix = "megalora: error: " if once or rank == 0 else f"megalora: error on rank {rank}: "
    lost = lost_peer(exc)
    if lost:  # not a bug of this rank: one line (the traceback only with --verbose)
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(prefix + lost, file=sys.stderr, flush=True)
        return 1
    if verbose or not user:
        traceback.print_exception(exc, file=sys.stderr)
    if user:
        print(prefix + str(exc), file=sys.stderr, flush=True)
        return 2
    print(prefix + f"unexpected {type(exc).__name__} (a bug: please report it with the "
          "traceback above)", file=sys.stderr, flush=True)
    return 1


@contextlib.contextmanager
def agree(what: str, group=None) -> Iterator[None]:
    """Run the block on every rank of ``group`` (default: the world); if it raised anywhere,
    raise one ``AgreedError`` on every rank, naming the ranks and their messages. Without a
    process group it is a plain block whose error is re-raised as ``AgreedError`` (user errors)
    or unchanged (bugs). A collective: every rank must enter it."""
    import torch.distributed as dist

    failure: Optional[BaseException] = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - gathered below, re-raised on every rank
        failure = exc
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    if not distributed:
        if failure is not None:
            if not is_user_error(failure):
                raise failure
            raise AgreedError(f"{what}: {failure}") from failure
        return
    mine = None if failure is None else (is_user_error(failure), str(failure) or
                                         type(failure).__name__)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    failed = [(rank, item) for rank, item in enumerate(everyone) if item is not None]
    if not failed:
        return
    if failure is not None and not is_user_error(failure):
        raise failure  # a bug: its own rank prints the traceback
    messages: dict = {}
    for rank, (user, text) in failed:
        text = text if user else f"unexpected error ({text}); its traceback is in rank " \
            f"{rank}'s output"
        messages.setdefault(text, []).append(rank)
    parts = [text if len(messages) == 1 and len(ranks) == dist.get_world_size(group)
             else f"rank {_ranks(ranks)}: {text}" for text, ranks in messages.items()]
    raise AgreedError(f"{what}: " + "; ".join(parts)) from failure


def _ranks(ranks: list) -> str:
    return str(ranks[0]) if len(ranks) == 1 else ",".join(map(str, ranks))
