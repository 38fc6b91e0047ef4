"""Transparent huge pages for host memory: re-executes a command-line tool once with glibc's `glibc.malloc.hugetlb=1`.

Why: every run of a compiled XLA:CPU program allocates its temp buffer (all the intermediate values; 272 MB for the
demo's training step) on an XLA worker thread, and glibc serves a request that large from a fresh `mmap` and unmaps
it on free (a thread's arena cannot hold it, whatever M_MMAP_THRESHOLD / M_MMAP_MAX say). So every step faulted the
buffer in again, 4 KiB at a time: ~70,000 page faults and ~115 ms of kernel time in a ~485 ms training step on one
core (BENCHMARKS.md, "Training"). With the tunable, glibc asks the kernel (madvise) for 2 MiB pages on the memory it
maps: ~300 faults a step. Torch, which allocates per op and reuses its blocks, barely feels it.

Tunables are read only when a process starts, hence the re-exec: before anything heavy is imported, the same
interpreter with the same command line (`sys.orig_argv`) and the variable added; child processes inherit it. Nothing
happens where it cannot help (not Linux + glibc 2.35 or newer, transparent huge pages set to `never`), when the
variable already names the tunable, or with MTJ_HUGEPAGE_MALLOC=0 (the opt-out). Written by hand: no library does this.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

OPT_OUT_ENV = "MTJ_HUGEPAGE_MALLOC"
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_supports_tunable() -> bool:
    """glibc 2.35 added glibc.malloc.hugetlb (older ones ignore it, so the re-exec would be wasted)."""
    if sys.platform != "linux":
        return False
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _thp_possible() -> bool:
    """Whether the kernel hands out transparent huge pages at all (its mode is `always` or `madvise`)."""
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepages_possible() -> bool:
    """Whether the tunable can take effect on this machine (Linux, glibc >= 2.35, huge pages not `never`)."""
    return _glibc_supports_tunable() and _thp_possible()


def hugepage_env(environ: Mapping[str, str]) -> dict | None:
    """The environment to re-execute with, or None when there is nothing to do (see the module docstring)."""
    if environ.get(OPT_OUT_ENV, "1") in ("0", "false", "no"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not hugepages_possible():
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with the tunable set, or returns at once when there is nothing to
    do (or the exec fails: the tool then runs as it is). Call it first thing in a script's `__main__` block."""
    env = hugepage_env(os.environ)
    if env is None or not getattr(sys, "orig_argv", None) or sys.argv[0] in ("-", ""):
        return  # (a script read from stdin cannot be read again)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
    except OSError:
        return
