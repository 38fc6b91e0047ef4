"""What the benchmark scripts share: the model-shape flags with per-device defaults, and pinning to CPU cores."""
from __future__ import annotations

import argparse
import os

_SHAPE_FLAGS = (("--layers", "layers", "model layers"), ("--d-model", "d_model", "model width"),
                ("--heads", "heads", "attention heads"), ("--vocab", "vocab", "vocabulary size"),
                ("--rotary", "rotary", "rotary dims per head"))


def add_shape_flags(p: argparse.ArgumentParser, cpu: dict, gpu: dict) -> None:
    """--layers, --d-model, --heads, --vocab, --rotary; their help names the CPU and --gpu defaults."""
    for flag, key, what in _SHAPE_FLAGS:
        p.add_argument(flag, type=int, help=f"{what} (CPU default {cpu[key]}; --gpu {gpu[key]})")


def apply_defaults(args: argparse.Namespace, cpu: dict, gpu: dict) -> argparse.Namespace:
    """Fills every flag left unset with the CPU or --gpu default (flags given explicitly win)."""
    for key, value in (gpu if args.gpu else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def pin_cpu_threads(threads: int) -> None:
    """Pins this process to `threads` cores, for XLA and torch alike; call before either starts its thread pool."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
