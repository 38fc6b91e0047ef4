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


@dataclasses.dataclass
class RayOptions:
    """Generation on Ray actors (star/ray_generation.py); the flags of iteration_train.py and device_inference.py.
    Off (ray_workers 0) unless --ray-workers is given. Not part of a run's identity: the answers are the same."""
    ray_address: Optional[str] = option(
        None, "Ray cluster to generate on: 'auto' (the running cluster, or $RAY_ADDRESS) or HOST:PORT of its head; "
              "not given with --ray-workers: a private Ray instance on this machine", flags=("--ray-address",))
    ray_workers: int = option(
        0, "generation workers (Ray actors, each with its own copy of the model and sampler, loaded from the "
           "checkpoint folder); 0: generate in this process", flags=("--ray-workers",), type=int)
    ray_worker_gpus: float = option(0.0, "GPUs per generation worker (Ray num_gpus; 0 on CPU)",
                                    flags=("--ray-worker-gpus",), type=float)
    ray_worker_cpus: float = option(1.0, "CPUs per generation worker (Ray num_cpus)", flags=("--ray-worker-cpus",),
                                    type=float)
    ray_timeout: float = option(
        3600.0, "seconds a worker may take for one batch (the first also loads the checkpoint and compiles); a worker "
                "that takes longer is killed and replaced, and its batch re-run", flags=("--ray-timeout",), type=float)
    ray_retries: int = option(3, "times one batch is re-run on a new worker (after a worker died or hung) before the "
                                 "run stops", flags=("--ray-retries",), type=int)


def ray_options(values: Mapping[str, Any], tool: str) -> RayOptions:
    """RayOptions from parsed flag values (vars(args)), checked; a bad value names its flag."""
    opts = build(RayOptions, values)
    if opts.ray_workers < 0:
        raise ValueError(f"--ray-workers {opts.ray_workers} ({tool}): give 0 (no Ray) or a number of workers")
    if opts.ray_address and not opts.ray_workers:
        raise ValueError(f"--ray-address {opts.ray_address} ({tool}) needs --ray-workers N (how many generation "
                         f"workers to start on that cluster)")
    if opts.ray_timeout <= 0 or opts.ray_retries < 0 or opts.ray_worker_cpus < 0 or opts.ray_worker_gpus < 0:
        raise ValueError(f"{tool}: --ray-timeout must be > 0 and --ray-retries, --ray-worker-cpus and "
                         f"--ray-worker-gpus >= 0")
    return opts


RAY_FIELDS = tuple(f.name for f in dataclasses.fields(RayOptions))  # the flags' dests, kept out of run identities
