"""Helpers of the multi-process tests: free ports, process groups that are always killed, the 2-process launches of
tests/dist_worker.py, and the tiny config they train (n_heads 8, so that a (1, 8) mesh cuts it)."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from cli_helpers import REPO, TINY, cli_env, free_port

DIST_TINY = {**TINY, "n_heads": 8}  # d_head 8; 8 divides n_heads, n_vocab (264), d_ff (256) and d_model
DIST_TRAIN = dict(gradient_accumulation_steps=2, warmup_steps=2, anneal_steps=20, lr=3e-3, end_lr=3e-4,
                  weight_decay=0.1)
GLOBAL_BATCH = 8


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of proc (it was started with start_new_session), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)


@contextlib.contextmanager
def process_group(procs: List[subprocess.Popen]):
    """Yields the list; every process in it is killed on the way out, whatever happened."""
    try:
        yield procs
    finally:
        for p in procs:
            kill_group(p)


def spawn(args: Sequence[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
    f = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=str(REPO), env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        f.close()


def wait_all(procs: List[subprocess.Popen], timeout: float, stop_when_one_fails: bool = True) -> List[int]:
    """Exit codes of all processes; when one fails (and stop_when_one_fails), the others are killed (a process of a
    jax.distributed run whose peer died waits in a collective). Raises TimeoutError past `timeout` seconds."""
    end = time.time() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if stop_when_one_fails and any(c not in (None, 0) for c in codes):
            for p in procs:
                kill_group(p)
            return [p.poll() for p in procs]
        if time.time() > end:
            raise TimeoutError(f"processes still running after {timeout}s: exit codes so far {codes}")
        time.sleep(0.2)


def two_process_run(config: str, out: pathlib.Path, cache: pathlib.Path, tag: str, dump: Optional[str] = None,
                    env_of: Optional[Dict[int, dict]] = None, timeout: float = 420) -> List[int]:
    """tests/dist_worker.py (device_train.py's run + a dump of the final state) as 2 processes x 4 CPU devices
    through jax.distributed on 127.0.0.1. Logs in out/{tag}_p{i}.log. Returns the exit codes."""
    port = free_port()
    procs: List[subprocess.Popen] = []
    with process_group(procs):
        for i in range(2):
            env = cli_env(4, cache, **(env_of or {}).get(i, {}))
            args = [REPO / "tests" / "dist_worker.py", "--config", config, "--no-progress",
                    "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            if dump:
                args += ["--dump", dump]
            procs.append(spawn(args, env, out / f"{tag}_p{i}.log"))
        return wait_all(procs, timeout)


def logs(out: pathlib.Path, tag: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(out.glob(f"{tag}_p*.log")))
