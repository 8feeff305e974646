"""Lazy access to the compiled extension ``megalora._C`` (built from ``csrc/`` by setup.py).

``load()`` returns the module or None (and remembers why); ``require()`` raises an error that
says how to get it. Importing megalora never imports the extension.
"""

from __future__ import annotations

from typing import Optional

_module = None
_error: Optional[str] = None
_tried = False


def load():
    """megalora._C, or None when it is not built or does not load."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            import torch  # noqa: F401  (loads libc10/libtorch the extension links against)
            from megalora import _C
            _module = _C
        except ImportError as exc:
            _error = str(exc)
    return _module


def unavailable_reason() -> Optional[str]:
    load()
    return None if _module is not None else _error


def require():
    """megalora._C, or an ImportError that says how to build it."""
    module = load()
    if module is None:
        raise ImportError(
            f"megalora._C is not available ({_error}). It is built by `pip install "
            "--no-build-isolation -e .` from the repository (a C++17 compiler and torch headers "
            "are needed; it is skipped when MEGALORA_SKIP_EXT=1). Use backend='torch' for the "
            "pure-PyTorch fallback.")
    return module
