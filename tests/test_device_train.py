"""device_train.py end to end on a tiny GPT-J, on the CPU, with real files in temp folders.

- the loss falls and validation losses are logged (metrics JSONL);
- a run SIGKILLed in the middle of writing a checkpoint, restarted with the same command, resumes from the last
  complete step and reproduces the uninterrupted run exactly (every metrics line, no duplicates, final params and
  Adam state), with the checkpoints on a local disk and on gs:// (storage emulator);
- 5 training steps on meshes (1,1), (1,4) and (2,4) give the same losses;
- bad inputs fail with one `error: ...` line naming the culprit, and nothing is written half.
"""
from __future__ import annotations

import json
import math
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_helpers import (TINY, TRAIN_KEYS, check_ok, cli_env, error_line, make_dataset, metrics_subset, read_metrics,
                         run_cli, write_config, xla_cache_dir)
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)
from mesh_transformer import checkpoint as ckpt
from mesh_transformer.config import load_config

STEPS, CKPT_EVERY, CRASH_AT = 12, 4, 8
DEVICES = 2  # the subprocess runs: mesh (1, 2), so every checkpoint has 2 shards
COMPARED = ("step", "loss", "ce", "lr", "grad_norm", "val/val/loss")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Train/val TFRecords, the training config (without its checkpoint folder) and a compilation cache."""
    root = tmp_path_factory.mktemp("device_train")
    train_index = make_dataset(root / "data", "train", n_docs=400, seed=1)
    val_index = make_dataset(root / "data", "val", n_docs=40, seed=2)
    train_keys = dict(**TRAIN_KEYS, total_steps=STEPS, ckpt_every=CKPT_EVERY, keep_n=2, train_set=train_index,
                      val_set={"val": val_index}, val_every=2, val_batches=2, name="tiny_run")
    return {"root": root, "keys": train_keys, "cache": xla_cache_dir(tmp_path_factory), "train_index": train_index}


def _train(work, config: str, cwd=None, **env) -> object:
    return run_cli("device_train.py", ["--config", config, "--no-progress"],
                   cli_env(DEVICES, work["cache"], **env), cwd=cwd)


@pytest.fixture(scope="module")
def run_a(work) -> dict:
    """The reference: 12 uninterrupted steps, checkpoints every 4 steps in a local folder."""
    folder = work["root"] / "a"
    folder.mkdir()
    config = write_config(folder / "config.json", **work["keys"], model_dir=str(folder / "ckpt"))
    check_ok(_train(work, config))
    return {"config": config, "ckpt": str(folder / "ckpt"), "metrics": read_metrics(folder / "ckpt" / "metrics.jsonl")}


def _assert_same_state(path_a: str, path_b: str, cfg) -> None:
    pa, oa, sa, aux_a = ckpt.load_checkpoint(path_a, cfg)
    pb, ob, sb, aux_b = ckpt.load_checkpoint(path_b, cfg)
    assert sa == sb == STEPS and aux_a == aux_b
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    jax.tree.map(np.testing.assert_array_equal, oa, ob)


# ---------------------------------------------------------------------------------------------------------------
# 1 and 7: the loss falls; validation is logged
# ---------------------------------------------------------------------------------------------------------------
def test_loss_falls_and_metrics_are_logged(run_a):
    metrics = run_a["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert {"loss", "ce", "lr", "grad_norm", "tokens_per_s", "mfu", "time"} <= set(m)
        assert math.isfinite(m["loss"]) and m["tokens_per_s"] > 0
    assert metrics[0]["lr"] == 0.0 and metrics[2]["lr"] == pytest.approx(3e-3)  # gpt3 schedule, warmup 2
    early = np.mean([m["loss"] for m in metrics[:3]])
    late = np.mean([m["loss"] for m in metrics[-3:]])
    print(f"loss: steps 1-3 mean {early:.3f}, steps {STEPS - 2}-{STEPS} mean {late:.3f}")
    assert early > 4.5  # ~ln(264) = 5.58 at init
    assert late < early - 1.5, (early, late)
    meta = json.loads((pathlib.Path(run_a["ckpt"]) / "meta.json").read_text())
    assert meta["checkpoints"] == [8, 12]  # keep_n 2
    assert meta["aux"]["12"]["train_loader"]["record_idx"] == STEPS * 2 * 4  # GA 2 x batch 4 records per step


def test_validation_losses_in_metrics(run_a):
    with_val = {m["step"]: m["val/val/loss"] for m in run_a["metrics"] if "val/val/loss" in m}
    assert sorted(with_val) == list(range(2, STEPS + 1, 2))  # val_every 2
    assert all(math.isfinite(v) for v in with_val.values())
    assert with_val[STEPS] < with_val[2]


# ---------------------------------------------------------------------------------------------------------------
# 2 and 3: crash in the middle of a checkpoint write, restart, exact resume
# ---------------------------------------------------------------------------------------------------------------
def test_crash_mid_checkpoint_resumes_exactly(work, run_a):
    folder = work["root"] / "b"
    folder.mkdir()
    ckpt_dir = folder / "ckpt"
    config = write_config(folder / "config.json", **work["keys"], model_dir=str(ckpt_dir))

    crashed = _train(work, config, STAR_TEST_CRASH_AT_STEP=str(CRASH_AT))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    # step 8 is half written, meta.json still names step 4 only; metrics were written up to step 8
    assert ckpt.latest_step(str(ckpt_dir)) == CKPT_EVERY
    shard_files = sorted(p.name for p in (ckpt_dir / f"step_{CRASH_AT}" / "shard_0").iterdir())
    assert 0 < len(shard_files) < 16, shard_files
    assert len(read_metrics(ckpt_dir / "metrics.jsonl")) == CRASH_AT

    check_ok(_train(work, config))  # the same command again
    metrics = read_metrics(ckpt_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # no duplicate lines
    assert metrics_subset(metrics, COMPARED) == metrics_subset(run_a["metrics"], COMPARED)  # bit-exact on CPU
    assert json.loads((ckpt_dir / "meta.json").read_text())["checkpoints"] == [8, 12]
    _assert_same_state(run_a["ckpt"], str(ckpt_dir), load_config(config))


def test_crash_resume_with_checkpoints_on_gcs(work, run_a, gcs_bucket, tmp_path):  # noqa: F811
    config = write_config(tmp_path / "config.json", **work["keys"], bucket=gcs_bucket, model_dir="runs/tiny")
    crashed = _train(work, config, cwd=tmp_path, STAR_TEST_CRASH_AT_STEP=str(CRASH_AT))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    url = f"gs://{gcs_bucket}/runs/tiny"
    assert ckpt.latest_step(url) == CKPT_EVERY

    check_ok(_train(work, config, cwd=tmp_path))
    metrics_path = tmp_path / "logs" / "tiny_run.metrics.jsonl"  # gs:// runs log metrics under ./logs
    metrics = read_metrics(metrics_path)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics_subset(metrics, COMPARED) == metrics_subset(run_a["metrics"], COMPARED)
    _assert_same_state(run_a["ckpt"], url, load_config(config))


# ---------------------------------------------------------------------------------------------------------------
# 4: dp x mp meshes agree
# ---------------------------------------------------------------------------------------------------------------
MESH_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[3])
from helpers import random_params
from mesh_transformer.config import load_config
from mesh_transformer.finetune import RunOptions, train
from mesh_transformer.model import CausalTransformer
from mesh_transformer.sharding import make_mesh
from mesh_transformer.train import Trainer

base, out = json.loads(sys.argv[1]), sys.argv[2]
params = random_params(CausalTransformer(load_config(base)), seed=3)
losses = {}
for dp, mp in [(1, 1), (1, 4), (2, 4)]:
    cfg = load_config({**base, "cores_per_replica": mp, "per_replica_batch": base["per_replica_batch"] // dp,
                       "model_dir": f"{out}/mesh_{dp}x{mp}"})
    trainer = Trainer(cfg, mesh=make_mesh(mp, devices=jax.devices()[:dp * mp]))
    assert dict(trainer.mesh.shape) == {"dp": dp, "mp": mp}, trainer.mesh.shape
    seen = []
    train(cfg, RunOptions(init_params=params, progress=False), trainer=trainer,
          on_step=lambda step, rec: seen.append(rec["loss"]))
    losses[f"{dp}x{mp}"] = seen
print("LOSSES " + json.dumps(losses))
"""


def test_meshes_give_the_same_losses(work, tmp_path):
    """The same 5 steps (same init, same global batch of 8) on meshes (dp, mp) = (1,1), (1,4), (2,4): one process
    with 8 CPU devices, each mesh on the first dp * mp of them; per_replica_batch = 8 / dp."""
    steps = 5
    base = {**TINY, "warmup_steps": 1, "anneal_steps": 10, "lr": 2e-3, "end_lr": 2e-4, "weight_decay": 0.1,
            "train_set": work["train_index"], "total_steps": steps, "per_replica_batch": 8}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(base), str(tmp_path),
                           str(pathlib.Path(__file__).parent)], cwd=str(tmp_path), env=cli_env(8, work["cache"]),
                          capture_output=True, text=True, timeout=600)
    check_ok(proc)
    line = [x for x in proc.stdout.splitlines() if x.startswith("LOSSES ")][-1]
    losses = {k: np.asarray(v) for k, v in json.loads(line[len("LOSSES "):]).items()}
    worst = max(float(np.max(np.abs(v / losses["1x1"] - 1))) for v in losses.values())
    print(f"losses per mesh {({k: v.round(5).tolist() for k, v in losses.items()})}; max rel diff {worst:.1e}")
    assert len(losses["1x1"]) == steps and losses["1x1"][-1] < losses["1x1"][0]
    np.testing.assert_allclose(losses["1x4"], losses["1x1"], rtol=1e-5)
    np.testing.assert_allclose(losses["2x4"], losses["1x1"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 6: bad input: one clear line, nothing written half
# ---------------------------------------------------------------------------------------------------------------
def _nothing_written(ckpt_dir: pathlib.Path) -> None:
    assert not (ckpt_dir / "meta.json").exists()
    assert not list(ckpt_dir.glob("step_*"))
    metrics = ckpt_dir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""


def test_unknown_config_key_is_named(work, tmp_path):
    config = write_config(tmp_path / "bad.json", **work["keys"], model_dir=str(tmp_path / "ckpt"), per_replica_bach=2)
    line = error_line(_train(work, config))
    assert "'per_replica_bach' unknown" in line and "per_replica_batch" in line and "bad.json" in line
    assert not (tmp_path / "ckpt").exists()


def test_index_naming_a_missing_file(work, tmp_path):
    index = tmp_path / "broken.index"
    records = sorted(pathlib.Path(work["train_index"]).parent.glob("train_*.tfrecords"))
    index.write_text(f"{records[0]}\n{tmp_path / 'missing_7.tfrecords'}\n")
    config = write_config(tmp_path / "cfg.json", **{**work["keys"], "train_set": str(index)},
                          model_dir=str(tmp_path / "ckpt"))
    line = error_line(_train(work, config))
    assert "broken.index" in line and "line 2" in line and "missing_7.tfrecords" in line and "does not exist" in line
    _nothing_written(tmp_path / "ckpt")


def test_record_of_the_wrong_length(work, tmp_path):
    from tfrecord_utils.records import write_index, write_token_records

    good = [list(range(33))] * 3
    write_token_records(tmp_path / "short.tfrecords", good + [list(range(20))] + good)
    write_index(tmp_path / "short.index", ["short.tfrecords"])
    config = write_config(tmp_path / "cfg.json", **{**work["keys"], "train_set": str(tmp_path / "short.index"),
                                                    "gradient_accumulation_steps": 1, "val_set": {}},
                          model_dir=str(tmp_path / "ckpt"))
    line = error_line(_train(work, config))
    assert "short.tfrecords" in line and "record 3" in line and "20 tokens, expected 33" in line
    _nothing_written(tmp_path / "ckpt")


def test_checkpoint_of_the_wrong_shape(work, tmp_path):
    from helpers import random_params
    from mesh_transformer.model import CausalTransformer

    other = load_config({**TINY, "d_model": 32, "cores_per_replica": 2})
    ckpt.save_checkpoint(str(tmp_path / "d32"), random_params(CausalTransformer(other)), 0, other)
    config = write_config(tmp_path / "cfg.json", **work["keys"], model_dir=str(tmp_path / "ckpt"))
    proc = run_cli("device_train.py", ["--config", config, "--no-progress", "--tune-model-path", tmp_path / "d32"],
                   cli_env(DEVICES, work["cache"]))
    line = error_line(proc)
    assert "checkpoint leaf" in line and "'d_model': 32" in line and "d_model=64 in the config" in line
    # both shapes: the leaf as found and as the config wants it (a [D] bias or a [V, D] / [D, X] matrix)
    assert "has shape (" in line and "expects (" in line
    _nothing_written(tmp_path / "ckpt")


def test_create_finetune_tfrecords_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("create_finetune_tfrecords.py", [tmp_path / "empty", "x", "--output-dir", tmp_path / "out",
                                                    "--tokenizer", "byte"], cli_env(1))
    line = error_line(proc)
    assert "empty" in line and "holds no files" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
