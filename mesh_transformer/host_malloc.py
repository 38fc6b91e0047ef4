"""Host memory for XLA:CPU: re-executes a command-line tool once with glibc malloc tunables that keep the memory it
frees mapped and on transparent huge pages.

Why: every run of a compiled XLA:CPU program allocates its temp buffer (all the intermediate values; 272 MB for the
demo's training step) on an XLA worker thread, and glibc serves a request that large from a fresh `mmap` and unmaps
it on free (a thread's own arena cannot hold it). So every step faulted the buffer in again, 4 KiB at a time:
~70,000 page faults and ~115 ms of kernel time in a ~485 ms training step on one core, and with 2 MiB pages still
~300 faults and 30-70 ms a step, the kernel zeroing 272 MB (BENCHMARKS.md, "Training"). The tunables, `TUNABLES`:
  * `arena_max=1`: every thread allocates from the main arena (the one that can grow by brk),
  * `mmap_max=0`: no request is served by its own mmap (glibc still falls back to mmap if brk fails),
  * `trim_threshold=1 GiB`: free memory at the top of the heap goes back to the kernel only past 1 GiB,
  * `hugetlb=1`: what the heap grows by is madvised for transparent huge pages (glibc >= 2.35; a no-op where huge
    pages are `never`).
Then the buffer freed by one step is the block the next step gets: no faults, no kernel time. The cost: a process
keeps up to 1 GiB of freed memory at the top of its heap (a freed block below live ones was kept before too); a
temp buffer over 1 GiB is given back and faulted in again as before. Torch, which allocates per op and reuses its
blocks, barely feels any of this.

Tunables are read only when a process starts, hence the re-exec: before anything heavy is imported, the same
interpreter with the same command line (`sys.orig_argv`) and the tunables added to GLIBC_TUNABLES; child processes
inherit them. A tunable the variable already names keeps the user's value. Nothing happens where it cannot help
(not Linux + glibc 2.35 or newer), when the variable already names them all, or with MTJ_HUGEPAGE_MALLOC=0 (the
opt-out). Written by hand: no library does this.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

OPT_OUT_ENV = "MTJ_HUGEPAGE_MALLOC"
TUNABLES = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0",
            "glibc.malloc.trim_threshold": str(1 << 30), "glibc.malloc.hugetlb": "1"}


def tunables_possible() -> bool:
    """Whether glibc reads the tunables here: Linux with glibc 2.35 or newer (the first with glibc.malloc.hugetlb;
    one condition for all four keeps the re-exec predictable)."""
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


def malloc_env(environ: Mapping[str, str]) -> dict | None:
    """The environment to re-execute with, or None when there is nothing to do (see the module docstring)."""
    if environ.get(OPT_OUT_ENV, "1") in ("0", "false", "no") or not tunables_possible():
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    added = [f"{name}={value}" for name, value in TUNABLES.items() if name not in named]
    if not added:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + added)
    return env


def reexec_with_malloc_tunables() -> None:
    """Replaces this process by the same command with the tunables set, or returns at once when there is nothing to
    do (or the exec fails: the tool then runs as it is). Call it first thing in a script's `__main__` block."""
    env = malloc_env(os.environ)
    if env is None or not getattr(sys, "orig_argv", None) or sys.argv[0] in ("-", ""):
        return  # (a script read from stdin cannot be read again)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
    except OSError:
        return
