"""Options stated once: a dataclass field holds its default, its help and its command-line flag.

`StarOptions` (star/loop.py) nests `PassOptions` (star/rationales.py) instead of copying its fields;
iteration_train.py generates its argparse flags from both with `add_flags`, and a task's `loop_preset` (beside the
task, star/tasks/) supplies the defaults that differ per task. A flag the user does not give stays None, so `build`
tells "not given" from "given the default": the preset first, then the field's default.

Why by hand: argparse-from-dataclass libraries (simple-parsing, tyro) rename flags or change their syntax; the
original's flag names (`--n_iters`, `--p_rationalization`, ...) are kept exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping, Optional, Sequence


def option(default: Any = None, help: str = "", *, flags: Sequence[str] = (), factory: Any = None,
           **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag (flags default to `--<field name>`). help="": a field
    that is set by code, not from the command line."""
    metadata = {"help": help, "flags": tuple(flags), "argparse": argparse_kwargs}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _nested(f: dataclasses.Field):
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return factory if factory is not None and dataclasses.is_dataclass(factory) else None


def add_flags(parser: argparse.ArgumentParser, cls, presets: Optional[Mapping[str, Mapping]] = None):
    """Adds one flag per option of `cls` (and of nested option dataclasses), each defaulting to None ("not given").
    presets: {task: {field: value}}, named in each flag's help where a task's default differs."""
    presets = presets or {}
    for f in dataclasses.fields(cls):
        if _nested(f):
            add_flags(parser, _nested(f), presets)
            continue
        if not f.metadata.get("help"):
            continue
        kwargs = dict(f.metadata["argparse"])
        default = f.default if f.default is not dataclasses.MISSING else None
        notes = [f"{task} {preset[f.name]!r}" for task, preset in presets.items()
                 if f.name in preset and preset[f.name] != default]
        help_text = f.metadata["help"]
        if kwargs.get("action") not in ("store_true", "store_false"):
            help_text += f" (default {default!r}" + (f"; {', '.join(notes)}" if notes else "") + ")"
        flags = f.metadata["flags"] or (f"--{f.name}",)
        parser.add_argument(*flags, dest=f.name, default=None, help=help_text, **kwargs)
    return parser


def build(cls, values: Mapping[str, Any], preset: Optional[Mapping[str, Any]] = None) -> Any:
    """An instance of cls from parsed flag values (None = not given), then the preset, then the fields' defaults."""
    preset = preset or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _nested(f):
            kwargs[f.name] = build(_nested(f), values, preset)
            continue
        value = values.get(f.name)
        if value is None:
            value = preset.get(f.name)
        if value is not None:
            kwargs[f.name] = value
    return cls(**kwargs)


def flat(instance: Any) -> dict:
    """Field name -> value of an options instance, nested option dataclasses flattened (as the flags are)."""
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        out.update(flat(value) if _nested(f) else {f.name: value})
    return out
