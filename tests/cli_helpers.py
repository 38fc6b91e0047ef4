"""Helpers for the CLI end-to-end tests: a tiny GPT-J config, TFRecords of generated text, and running the repo's
CLIs in a subprocess with a chosen number of CPU devices and a shared XLA compilation cache."""
from __future__ import annotations

import json
import os
import pathlib
import random
import socket
import subprocess
import sys
from typing import Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]

# 2 layers, d_model 64, byte tokenizer (ids 0..256; n_vocab 264 divides by 1, 2, 4 and 8 shards)
TINY = dict(layers=2, d_model=64, n_heads=4, n_vocab=264, seq=32, pe_rotary_dims=8, compute_dtype="float32",
            tokenizer="byte")
# training keys of the CLI runs: mesh (1, 2), 2 x 4 sequences per step. Runs with equal keys (and shapes) share one
# compiled train step through the session's compilation cache, across test modules.
TRAIN_KEYS = dict(cores_per_replica=2, per_replica_batch=4, gradient_accumulation_steps=2, warmup_steps=2,
                  anneal_steps=20, lr=3e-3, end_lr=3e-4, weight_decay=0.1)


def generated_text(n_docs: int, seed: int) -> str:
    """Short, repetitive English-like documents separated by <|endoftext|>: quick to learn."""
    rng = random.Random(seed)
    who = ["the cat", "a dog", "the bird", "my friend", "the teacher"]
    did = ["sat on", "looked at", "ran to", "jumped over", "walked past"]
    what = ["the mat", "a tree", "the house", "the river", "a car"]
    docs = []
    for _ in range(n_docs):
        docs.append(" ".join(f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)}." for _ in range(3)))
    return "<|endoftext|>".join(docs)


def make_dataset(folder: pathlib.Path, name: str, n_docs: int, seed: int) -> str:
    """Writes {folder}/{name}.txt, packs it with create_finetune_tfrecords' library (byte tokenizer, seq 32) and
    returns the index path."""
    from tfrecord_utils.build import build_tfrecords

    folder.mkdir(parents=True, exist_ok=True)
    text_dir = folder / f"{name}_text"
    text_dir.mkdir(exist_ok=True)
    (text_dir / f"{name}.txt").write_text(generated_text(n_docs, seed))
    result = build_tfrecords(str(text_dir), name, str(folder), seq_len=TINY["seq"], tokenizer="byte", seed=seed)
    return result.index_path


def write_config(path: pathlib.Path, **keys) -> str:
    path.write_text(json.dumps({**TINY, **keys}, indent=1))
    return str(path)


def xla_cache_dir(tmp_path_factory) -> pathlib.Path:
    """One persistent compilation cache for the test session: CLI runs of the same program (same shapes, mesh and
    hyper-parameters) in any test module compile it once."""
    return tmp_path_factory.getbasetemp() / "xla_cache"


def cli_env(devices: int, cache_dir: Optional[pathlib.Path] = None, **extra: str) -> dict:
    """Environment of a CLI subprocess: `devices` CPU devices, XLA's backend optimisations off (the tiny models'
    compile time, not their run time, dominates these tests: this halves it; runs that are compared all use the
    same flags), the persistent compilation cache (every run of the same config then compiles once per session),
    and `extra` variables."""
    env = {k: v for k, v in os.environ.items() if k != "STAR_TEST_CRASH_AT_STEP"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra)
    return env


def run_cli(script: str, args: Sequence[str], env: dict, cwd: Optional[pathlib.Path] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """python {REPO}/{script} args..., output captured as text."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=str(cwd or REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-5000:]}")


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a failed CLI (and no traceback)."""
    assert proc.returncode == 1, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-5000:]
    return lines[0]


def read_metrics(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_subset(metrics: list, keys: Sequence[str]) -> list:
    """Each metrics record cut down to `keys` (those it has): what two runs that should agree are compared on."""
    return [{k: m[k] for k in keys if k in m} for m in metrics]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server or coordinator a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
