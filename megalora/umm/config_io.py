"""Reading run configs: YAML with YAML 1.2 numbers, and config values checked against the types
the dataclasses declare.

PyYAML implements YAML 1.1, where ``5e-3`` and ``1e9`` (no dot) are strings: ``lr: 5e-3`` then
reached the trainer as a string and failed deep inside with a raw TypeError. ``load_yaml``
reads them as floats, as YAML 1.2, JSON and Python do. ``coerce_fields`` then checks each value
against its field's annotation, so that ``train.resume=maybe`` or ``train.steps=ten`` is refused
with the field's name instead of being taken as true or failing later.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Dict

import yaml

# YAML 1.2's float forms that YAML 1.1 lacks: an exponent without a dot (1e9, 5e-3, -2E+4)
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 exponent floats as floats."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` (a file's content or one override's value); ``where`` names it in
    errors."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {exc}") from None


def _kind(tp) -> tuple:
    """(base type, optional) for the annotations this checks; (None, _) for the others."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return (inner if inner in (bool, int, float) else None), True
    return (tp if tp in (bool, int, float) else None), False


def _coerce(where: str, kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 -> 1000
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where} must be a number, got {value!r}")
    return value  # strings: each section checks its choices (YAML reads `off` as false)


def coerce_fields(section: str, klass, values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` with each scalar field checked against ``klass``'s annotation (ints from
    integral floats, floats from ints); a clear error naming ``section.field`` otherwise.
    Unknown names and non-scalar fields pass through for the dataclass to judge."""
    hints = typing.get_type_hints(klass)
    names = {f.name for f in dataclasses.fields(klass)}
    out = dict(values)
    for name, value in values.items():
        if name not in names:
            continue
        kind, optional = _kind(hints.get(name))
        if kind is None or (optional and value is None):
            continue
        out[name] = _coerce(f"{section}.{name}", kind, value)
    return out
