"""train.py, the Ray pod driver, on a local Ray cluster started here: 2 "hosts" (one node offering the jax_host
resource twice), each a device_train.py process with 4 CPU devices on one (2,4) mesh through jax.distributed.

- it trains as device_train.py does in one process with 8 devices (losses within rtol 1e-5, final params close),
  and streams process 0's metrics lines back;
- host 1's process killed mid-run (it SIGKILLs itself in the middle of writing step 4's checkpoint): train.py stops
  host 0, starts both again, they resume from step 2 and finish with the uninterrupted run's final params, bit for
  bit, and its metrics lines.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from cli_helpers import REPO, cli_env, free_port, make_dataset, read_metrics, write_config, xla_cache_dir
from dist_helpers import DIST_TINY, DIST_TRAIN, GLOBAL_BATCH, kill_group
from mesh_transformer import checkpoint as ckpt
from mesh_transformer.config import load_config

STEPS, EVERY, CRASH_AT = 6, 2, 4


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_py")
    index = make_dataset(root / "data", "train", n_docs=300, seed=4)
    return {"root": root, "index": index, "cache": xla_cache_dir(tmp_path_factory)}


@pytest.fixture(scope="module")
def ray_cluster(work):
    """`ray start --head --block` in its own process group (killed whole at the end), on free ports, with the
    jax_host resource twice and CPUs to spare (Ray waits forever when actors hold every CPU)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    ports = {flag: str(free_port()) for flag in ("--ray-client-server-port", "--node-manager-port",
                                                 "--object-manager-port", "--metrics-export-port",
                                                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                 "--runtime-env-agent-port")}
    # token authentication (on by default for `ray start` in Ray 2.60) is for clusters on a network: off here
    env = cli_env(4, work["cache"], RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                  TMPDIR=temp)  # the hosts' log files go there too, and are removed with it
    log = open(work["root"] / "ray_head.log", "w")
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--node-ip-address=127.0.0.1",
                             '--resources={"jax_host": 2}', "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}", *[f"{k}={v}" for k, v in ports.items()]],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:  # wait until the head answers
            probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}'); "
                                    "print(ray.cluster_resources().get('jax_host'))"],
                                   env=env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0 and "2.0" in probe.stdout:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start: {(work['root'] / 'ray_head.log').read_text()[-3000:]}"
                                   f"\n{probe.stderr[-2000:]}")
            time.sleep(2)
        yield {"address": address, "env": env}
    finally:
        kill_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _config(work, name: str) -> str:
    folder = work["root"] / name
    folder.mkdir()
    return write_config(folder / "config.json", **DIST_TINY, **DIST_TRAIN, cores_per_replica=4,
                        per_replica_batch=GLOBAL_BATCH // 2, total_steps=STEPS, ckpt_every=EVERY, keep_n=None,
                        train_set=work["index"], model_dir=str(folder / "ckpt"), name=name)


def _train_py(ray_cluster, config: str, **env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", config, "--num-hosts", "2",
                             "--ray-address", ray_cluster["address"], "--devices-per-host", "4", "--max-restarts",
                             "2", "--ray-timeout", "120", "--no-progress"],
                            cwd=str(REPO), env={**ray_cluster["env"], **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _streamed(stdout: str) -> list:
    return [json.loads(line[len("metrics "):]) for line in stdout.splitlines() if line.startswith("metrics ")]


def _events(stdout: str, kind: str) -> list:
    return [e for e in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))
            if e.get("event") == kind]


@pytest.fixture(scope="module")
def uninterrupted(work, ray_cluster) -> dict:
    config = _config(work, "uninterrupted")
    proc = _train_py(ray_cluster, config)
    return {"config": config, "ckpt": str(work["root"] / "uninterrupted" / "ckpt"), "stdout": proc.stdout}


@pytest.mark.timeout(900)
def test_train_py_equals_device_train_on_one_process(uninterrupted, tmp_path):
    metrics = read_metrics(pathlib.Path(uninterrupted["ckpt"]) / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert _streamed(uninterrupted["stdout"]) == metrics, "process 0's metrics lines, streamed back in order"
    assert len(_events(uninterrupted["stdout"], "host_started")) == 2

    from mesh_transformer.finetune import RunOptions, train
    cfg = load_config(uninterrupted["config"]).replace(model_dir=str(tmp_path / "one"))
    state = train(cfg, RunOptions(progress=False))  # device_train.py's loop, this process's 8 devices
    want = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    np.testing.assert_allclose([m["loss"] for m in metrics], want, rtol=1e-5)
    params, _, step, _ = ckpt.load_checkpoint(uninterrupted["ckpt"], cfg)
    assert step == STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5), params,
                 state.params)


@pytest.mark.timeout(900)
def test_a_killed_host_restarts_all_from_the_last_checkpoint(work, ray_cluster, uninterrupted):
    config = _config(work, "killed")
    proc = _train_py(ray_cluster, config, STAR_TEST_TRAIN_PY_CRASH=f"1:{CRASH_AT}")
    failed = _events(proc.stdout, "host_failed")
    assert len(failed) == 1 and "host 1" in failed[0]["why"] and "-9" in failed[0]["why"], proc.stdout[-3000:]
    assert [e["attempt"] for e in _events(proc.stdout, "host_started")] == [0, 0, 1, 1]
    restarted_0 = [e for e in _events(proc.stdout, "host_started") if e["attempt"] == 1 and e["process_id"] == 0]
    host_log = pathlib.Path(restarted_0[0]["log"]).read_text()
    assert f"from step {CRASH_AT - EVERY}" in host_log, host_log[-3000:]

    folder = work["root"] / "killed" / "ckpt"
    cfg = load_config(config)
    a = ckpt.load_checkpoint(str(folder), cfg)
    b = ckpt.load_checkpoint(uninterrupted["ckpt"], cfg)
    assert a[2] == b[2] == STEPS and a[3] == b[3]
    jax.tree.map(np.testing.assert_array_equal, a[0], b[0])  # final params, bit for bit
    jax.tree.map(np.testing.assert_array_equal, a[1], b[1])  # and the Adam state
    compared = ("step", "loss", "ce", "lr", "grad_norm")
    got = [{k: m[k] for k in compared} for m in read_metrics(folder / "metrics.jsonl")]
    want = [{k: m[k] for k in compared} for m in read_metrics(pathlib.Path(uninterrupted["ckpt"]) / "metrics.jsonl")]
    assert got == want
    assert [m["step"] for m in _streamed(proc.stdout)] == list(range(1, STEPS + 1)), "each step streamed once"
