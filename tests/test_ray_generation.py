"""STaR generation on Ray workers (star/ray_generation.py, --ray-address / --ray-workers), on a local Ray cluster
this module starts (4 CPUs: 2 one-CPU workers, a replacement, and room to spare) and stops.

- the 2-iteration arithmetic run of tests/test_star_loop.py (its oracle driver, a tiny GPT-J, one CPU device per
  process) with 2 Ray workers writes the same files as in one process: rationales, eval answers, training text,
  TFRecords, losses, fine-tuned weights, results.json;
- the same with a worker that exits in the middle of its second batch (test hook STAR_TEST_RAY_WORKER_EXIT): it is
  replaced, its batch re-run, and every file is still the same (each question answered once);
- device_inference.py with --ray-workers 2 writes the same answers file as without, also when a worker hangs (it is
  killed after --ray-timeout, replaced, and its batch re-run).

The drivers are subprocesses with one CPU device; they pass their XLA_FLAGS (one device, fast compile) and the
session's compilation cache to the workers, which otherwise would inherit this process's 8 simulated devices.
"""
from __future__ import annotations

import os
import pathlib

import pytest

from cli_helpers import REPO, check_ok, cli_env, run_cli, write_config
from test_star_loop import ARITH_ARGS, ARITH_SEQ, N_ITERS, ORACLE_DRIVER, TRAIN_KEYS, _check_report, _snapshot

ray = pytest.importorskip("ray")

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster for this module; the CLIs join it with --ray-address."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        ctx = ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    from helpers import random_params
    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from mesh_transformer.model import CausalTransformer

    root = tmp_path_factory.mktemp("ray_generation")
    cfg_path = write_config(root / "arith.json", **{**TRAIN_KEYS, "seq": ARITH_SEQ})
    cfg = load_config(cfg_path)
    base = root / "base"
    ckpt.save_checkpoint(str(base), random_params(CausalTransformer(cfg), seed=0, bias_scale=0.02), 0, cfg, shards=1)
    driver = root / "oracle_iteration_train.py"
    driver.write_text(ORACLE_DRIVER.format(repo=str(REPO)))
    return {"root": root, "cfg": cfg_path, "base": str(base), "driver": driver, "cache": root / "xla_cache"}


def _env(work, **extra) -> dict:
    env = cli_env(1, work["cache"], **RAY_ENV, **extra)
    for key in ("STAR_TEST_KILL_AT", "STAR_TEST_RAY_WORKER_EXIT"):
        if key not in extra:
            env.pop(key, None)
    return env


def _arith_run(work, out: pathlib.Path, ray_args=(), **env):
    args = [*ARITH_ARGS, "--config", work["cfg"], "--base_model_location", work["base"], "--out-dir", out, *ray_args]
    return run_cli(str(work["driver"]), args, _env(work, **env), timeout=420)


def _ray_args(address: str) -> list:
    return ["--ray-address", address, "--ray-workers", "2", "--ray-timeout", "240"]


@pytest.fixture(scope="module")
def one_process(work) -> pathlib.Path:
    out = work["root"] / "one_process"
    check_ok(_arith_run(work, out))
    return out


def _same_files(got: pathlib.Path, want: pathlib.Path) -> None:
    a, b = _snapshot(got), _snapshot(want)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key] == b[key], f"{key} differs from the one-process run"
    assert _table(got) == _table(want)


def _table(out: pathlib.Path) -> list:
    """results.md's table without its last column (minutes)."""
    rows = [line.split("|")[1:-2] for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    assert rows and rows[0][-1].strip() == "dev all %"
    return rows


def test_two_ray_workers_make_the_same_files_as_one_process(work, one_process, ray_address):
    out = work["root"] / "ray2"
    proc = _arith_run(work, out, _ray_args(ray_address))
    check_ok(proc)
    assert "started 2 Ray generation workers" in proc.stderr
    _check_report(out, N_ITERS)
    _same_files(out, one_process)


def test_a_worker_killed_mid_generation_is_replaced_and_nothing_changes(work, one_process, ray_address):
    out = work["root"] / "ray2_killed"
    marker = work["root"] / "worker_exited"
    proc = _arith_run(work, out, _ray_args(ray_address), STAR_TEST_RAY_WORKER_EXIT=f"2:{marker}")
    check_ok(proc)
    assert marker.exists(), "the test hook did not make a worker exit"
    assert proc.stderr.count("Ray generation worker replaced") == 1, proc.stderr[-3000:]
    _same_files(out, one_process)  # every question answered once: same rationales and eval answers, line for line


INFERENCE_ARGS = ["--dataset_mode", "arithmetic", "--split", "train", "--n_train_samples", "12", "--gen_length", "40",
                  "--eval_batch_size", "4"]  # 3 batches: 2 at once on 2 workers, then 1


@pytest.fixture(scope="module")
def plain_answers(work) -> pathlib.Path:
    """device_inference.py's answers file in one process."""
    out = work["root"] / "plain_answers.jsonl"
    check_ok(run_cli("device_inference.py", ["--config", work["cfg"], "--ckpt", work["base"], *INFERENCE_ARGS,
                                             "--out", out], _env(work)))
    assert len(out.read_text().splitlines()) == 12
    return out


def _inference_on_ray(work, out, ray_address, timeout="240", **env):
    return run_cli("device_inference.py", ["--config", work["cfg"], "--ckpt", work["base"], *INFERENCE_ARGS,
                                           "--out", out, "--ray-address", ray_address, "--ray-workers", "2",
                                           "--ray-timeout", timeout], _env(work, **env))


def test_device_inference_with_ray_workers_writes_the_same_answers(work, ray_address, plain_answers, tmp_path):
    check_ok(_inference_on_ray(work, tmp_path / "ray.jsonl", ray_address))
    assert (tmp_path / "ray.jsonl").read_text() == plain_answers.read_text()


def test_a_hung_worker_times_out_is_replaced_and_its_batch_rerun(work, ray_address, plain_answers, tmp_path):
    """The worker that gets batch 3 (its second) never answers: after --ray-timeout it is killed and replaced."""
    marker = tmp_path / "worker_hung"
    proc = _inference_on_ray(work, tmp_path / "ray.jsonl", ray_address, timeout="30",
                             STAR_TEST_RAY_WORKER_EXIT=f"2:{marker}:hang")
    check_ok(proc)
    assert marker.exists() and "took over --ray-timeout 30 s" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "ray.jsonl").read_text() == plain_answers.read_text()


def test_ray_flags_are_checked_and_off_by_default(capsys):
    import device_inference
    import iteration_train
    assert iteration_train.parse_args([]).ray.ray_workers == 0  # without Ray flags nothing changes
    for parse in (iteration_train.parse_args,
                  lambda a: device_inference.parse_args(["--config", "c.json", *a])):
        with pytest.raises(SystemExit) as exc:
            parse(["--ray-address", "auto"])
        assert exc.value.code == 2 and "--ray-address auto" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parse(["--ray-workers", "-1"])
        assert "--ray-workers -1" in capsys.readouterr().err
    args = iteration_train.parse_args(["--ray-workers", "2"])
    assert not any(k.startswith("ray_") for k in vars(args))  # kept out of the run identity
