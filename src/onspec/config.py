"""Typed configs, one per subsystem, with help text and range checks in one place; the CLI is
built from them. A config is a dataclass whose fields are declared with `option(...)`; its
`__post_init__` raises ValueError for out-of-range values, and the CLI turns that into a clear
message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default, help: str, *, flag: str | None = None, choices=None, cli: bool = True):
    """A config field with its CLI help. `flag` overrides the default `--field-name`."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    if isinstance(default, (list, tuple, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def add_arguments(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """Add one CLI flag per field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _base_type(hints[f.name])
        kw: dict = {"dest": f.name, "help": f.metadata["help"] + (f" (default: {default})" if default not in (None, False, ()) else "")}
        if kind is bool:
            kw.update(action="store_true", default=default)
        elif kind is tuple:
            kw.update(action="append", default=None, metavar="TEXT")
        else:
            kw.update(type=kind, default=default, choices=f.metadata.get("choices"))
        group.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Build `cls` from parsed args (fields absent from args keep their defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name) and getattr(args, f.name) is not None:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _base_type(hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple or hint is tuple:
        return tuple
    return hint
