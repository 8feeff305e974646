"""How megalora's entry points set up logging and upstream warnings.

Each command (``megalora ...``, ``python -m megalora.umm.convert``, ``python -m megalora.bench``)
runs inside ``entry_point(verbose, rank)``:

* By default, upstream notices a user cannot act on are hidden: megatron-core's "Transformer
  Engine / Apex are not installed, falling back ..." warnings at import, its deprecation of its
  own default ``cuda_graph_scope``, torch's FutureWarnings about the collectives megatron calls,
  and megatron's INFO logs (DDP's parameter/bucket list, the optimizer config). Every other
  warning still shows. megalora's own notices (logger ``"megalora"``, INFO) print on rank 0;
  the other ranks print warnings and errors only.
* ``--verbose`` (or ``MEGALORA_VERBOSE=1``) shows every warning (once per place, deprecations
  included), upstream INFO logs and megalora's DEBUG lines on rank 0.

Nothing is set at import, and both are undone when the command returns: a script that imports
megalora (or calls ``megalora.cli.main``) keeps its own warning filters and logging set-up.
Python's own ``-W`` / ``PYTHONWARNINGS`` options win over both modes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator, List, Optional, Tuple

# (category, message regex, module regex). The warnings module matches both regexes at the start
# of the text, the message one case-insensitively; the module is where the warning is raised.
UPSTREAM_WARNINGS = (
    # megatron-core at import: optional accelerations it did not find. megalora runs on the
    # local implementations and says so itself where it matters (``megalora.ops``).
    (UserWarning, r".*\b(transformer engine|apex)\b.*(not installed|falling back)", r"megatron"),
    # megatron-core's TransformerConfig deprecates the value its own field defaults to.
    (UserWarning, r"full scope is deprecated", r"megatron"),
    # torch deprecates all_gather_into_tensor / reduce_scatter_tensor, which megatron-core's
    # TP mappings call; megalora's own collectives already use the new names (megalora.comm).
    (FutureWarning, r".*is deprecated", r"torch\.distributed"),
)

UPSTREAM_FORMAT = "%(message)s"


def take_verbose(argv: Optional[List[str]] = None) -> Tuple[bool, List[str]]:
    """(whether ``--verbose`` is anywhere in ``argv`` or MEGALORA_VERBOSE=1, ``argv`` without
    it); ``argv`` defaults to ``sys.argv[1:]``."""
    from megalora.errors import verbose_requested

    argv = list(sys.argv[1:] if argv is None else argv)
    return verbose_requested(argv), [a for a in argv if a != "--verbose"]


def levels(verbose: bool, rank: int) -> Tuple[int, int]:
    """(level of the root logger, i.e. upstream libraries; level of ``"megalora"``)."""
    if rank != 0:
        return logging.WARNING, logging.WARNING  # one rank speaks for the job
    return (logging.INFO, logging.DEBUG) if verbose else (logging.WARNING, logging.INFO)


def _filter_warnings(verbose: bool) -> None:
    # -W / PYTHONWARNINGS is the user's explicit choice: leave their filters as they are.
    if sys.warnoptions:
        return
    if verbose:
        warnings.simplefilter("default")  # everything, DeprecationWarning too, once per place
        return
    for category, message, module in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def _logging_levels(verbose: bool, rank: int) -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger("megalora")
    saved = root.level, ours.level
    handler = None
    if not root.handlers:  # what basicConfig would add; a host's own handlers are kept
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(UPSTREAM_FORMAT))
        root.addHandler(handler)
    root_level, our_level = levels(verbose, rank)
    root.setLevel(root_level)
    ours.setLevel(our_level)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
        if handler is not None:
            root.removeHandler(handler)


@contextlib.contextmanager
def entry_point(verbose: bool, rank: int = 0) -> Iterator[None]:
    """Logging levels and warning filters for one run of a megalora command (module docstring);
    restored on exit. Enter it before the command imports megatron: its warnings fire at
    import, once."""
    with warnings.catch_warnings(), _logging_levels(verbose, rank):
        _filter_warnings(verbose)
        yield
