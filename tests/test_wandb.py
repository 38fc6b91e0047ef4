"""W&B logging (mesh_transformer/wandb_log.py): a 3-step device_train.py run with --wandb-mode offline writes a run
folder whose history, read back from its .wandb file, holds every logged key; STaR rows and artifacts; and with the
default (disabled) nothing imports wandb."""
import json
import subprocess
import sys

import pytest

from cli_helpers import REPO, TRAIN_KEYS, check_ok, cli_env, make_dataset, read_metrics, run_cli, write_config, \
    xla_cache_dir

wandb = pytest.importorskip("wandb")

from mesh_transformer import wandb_log  # noqa: E402
from test_star_loop import work  # noqa: E402,F401  (pytest fixture: configs, a random base, the oracle driver)


def test_device_train_offline_run_history_holds_the_logged_keys(tmp_path, tmp_path_factory):
    train_index = make_dataset(tmp_path / "data", "train", n_docs=200, seed=1)
    val_index = make_dataset(tmp_path / "data", "val", n_docs=40, seed=2)
    config = write_config(tmp_path / "config.json", **TRAIN_KEYS, total_steps=3, ckpt_every=0, train_set=train_index,
                          val_set={"val": val_index}, val_every=3, val_batches=1, name="wandb_run",
                          model_dir=str(tmp_path / "ckpt"))
    env = cli_env(2, xla_cache_dir(tmp_path_factory), WANDB_SILENT="true", WANDB_API_KEY="", WANDB_DISABLE_CODE="true")
    proc = run_cli("device_train.py", ["--config", config, "--no-progress", "--wandb-mode", "offline",
                                       "--wandb-project", "star-test", "--wandb-dir", str(tmp_path / "wb")], env)
    check_ok(proc)
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wb").rglob("*"))
    history = wandb_log.read_history(str(runs[0]))
    metrics = read_metrics(tmp_path / "ckpt" / "metrics.jsonl")
    assert [row["train/step"] for row in history] == [1, 2, 3] == [m["step"] for m in metrics]
    for key in ("train/loss", "train/ce", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "train/global_step"):
        assert all(key in row for row in history), key
    assert [row["train/loss"] for row in history] == pytest.approx([m["loss"] for m in metrics])
    assert history[-1]["val/val/loss"] == pytest.approx(metrics[-1]["val/val/loss"])
    run_record = next(r for r in wandb_log.read_records(str(runs[0])) if r.WhichOneof("record_type") == "run")
    assert run_record.run.project == "star-test" and run_record.run.display_name == "wandb_run"


def test_star_rows_and_artifacts(tmp_path):
    """What iteration_train.py logs per iteration and at the end, through the same module (in-process)."""
    (tmp_path / "results.md").write_text("| iteration | dev |\n|---|---|\n| 1 | 50.0 |\n")
    try:
        wandb_log.configure("star-test", "offline", str(tmp_path / "wb"), "star_demo", {"task": "arithmetic"})
        wandb_log.log_iteration({"iteration": 0, "steps": 0, "dev_accuracy": {"1": 0.5, "all": 0.25}})
        wandb_log.log_iteration({"iteration": 1, "steps": 40, "train": {"accuracy": 0.3, "kept": 12},
                                 "dev_accuracy": {"1": 0.75, "all": 0.5}, "complete": True})
        wandb_log.log_files([str(tmp_path / "results.md"), str(tmp_path / "missing.png")])
        folder = wandb_log.run_dir()
    finally:
        wandb_log.finish()
        wandb_log.configure(None, "disabled")
    history = wandb_log.read_history(folder)
    import collections
    kinds = collections.Counter(r.WhichOneof("record_type") for r in wandb_log.read_records(folder))
    assert [r["star/iteration"] for r in history] == [0, 1], (folder, kinds)
    assert history[1]["star/dev_accuracy/all"] == 0.5 and history[1]["star/train/kept"] == 12
    assert history[1]["star/steps"] == 40 and history[1]["star/complete"] == 1
    assert "results.md" in wandb_log.read_artifact_files(folder)


def test_disabled_imports_no_wandb(tmp_path):
    code = ("import sys, device_train, iteration_train\n"
            "from mesh_transformer import wandb_log\n"
            "from mesh_transformer.finetune import MetricsWriter\n"
            "from mesh_transformer.config import load_config\n"
            "a = device_train.parse_args(['--config', 'tiny'])\n"
            "assert a.wandb_mode == 'disabled'\n"
            "wandb_log.configure(a.wandb_project, a.wandb_mode)\n"
            f"MetricsWriter({str(tmp_path / 'm.jsonl')!r}, load_config('tiny')).write({{'step': 1, 'loss': 1.0}})\n"
            "assert 'wandb' not in sys.modules, 'wandb was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                          env=cli_env(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "m.jsonl").read_text())["loss"] == 1.0


@pytest.mark.slow
def test_iteration_train_offline_run_logs_every_iteration_and_the_report(work, tmp_path):
    """The STaR demo loop of tests/test_star_loop.py (2 iterations, oracle driver) with --wandb-mode offline."""
    from test_star_loop import ARITH_ARGS, N_ITERS, _env

    out = tmp_path / "star"
    args = [*ARITH_ARGS, "--config", work["arith_cfg"], "--base_model_location", work["base"], "--out-dir", out,
            "--wandb-mode", "offline", "--wandb-dir", tmp_path / "wb"]
    check_ok(run_cli(str(work["driver"]), args, _env(work, WANDB_SILENT="true", WANDB_API_KEY="")))
    (folder,) = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    history = wandb_log.read_history(str(folder))
    rows = json.loads((out / "results.json").read_text())
    star = [r for r in history if "star/iteration" in r]
    assert [r["star/iteration"] for r in star] == [row["iteration"] for row in rows] == list(range(N_ITERS + 1))
    assert star[-1]["star/dev_accuracy/all"] == rows[-1]["dev_accuracy"]["all"]
    train = [r for r in history if "train/loss" in r]
    assert len(train) == sum(row["steps"] for row in rows)  # every fine-tuning step of every iteration
    assert [r["train/global_step"] for r in train] == list(range(1, len(train) + 1))
    assert {"results.md", "accuracy.png", "results.json"} <= set(wandb_log.read_artifact_files(str(folder)))
