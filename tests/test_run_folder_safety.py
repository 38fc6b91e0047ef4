"""Issue 19: a run folder has one owner and one history. One test per fault of the issue's list (each exited 0 with
wrong results, or with a traceback, before), and two writers started at the same moment on one folder, 20 times.

CLIs are called in-process (`run_main(main, argv)`) where no subprocess is needed; the races use real processes.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from cli_helpers import REPO, TINY, cli_env, make_dataset, read_metrics, write_config
from mesh_transformer import checkpoint as ckpt
try:
    from mesh_transformer import run_lock
except ImportError:  # lets this module run against code from before issue 19 (its tests then fail, not crash)
    run_lock = None
from mesh_transformer.cli_util import run_main
from mesh_transformer.config import load_config

# in-process runs: 8 CPU devices (conftest), mesh (4, 2), 4 x 1 sequences per step
KEYS = dict(cores_per_replica=2, per_replica_batch=1, gradient_accumulation_steps=1, warmup_steps=2,
            anneal_steps=20, lr=3e-3, end_lr=3e-4, weight_decay=0.1, total_steps=3, ckpt_every=2, name="safety")


def call(main, argv, capsys):
    """(exit code, stderr) of an in-process CLI call; argparse's exits count as exit codes."""
    try:
        rc = run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("safety")
    index = make_dataset(root / "data", "train", n_docs=60, seed=1)
    return {"root": root, "index": index}


def _config(tmp_path, data, **extra) -> str:
    return write_config(tmp_path / "cfg.json", **{**KEYS, "train_set": data["index"],
                                                  "model_dir": str(tmp_path / "ckpt"), **extra})


def _train_state(cfg):
    from helpers import random_params
    from mesh_transformer.model import CausalTransformer
    from mesh_transformer.train import TrainState, make_optimizer
    params = random_params(CausalTransformer(cfg), seed=0, bias_scale=0.02)
    return TrainState(params, make_optimizer(cfg).init(params), np.asarray(0, np.int32))


class Holder:
    """Another process holding a folder's lock (a real, live process of this host)."""

    def __init__(self, folder: pathlib.Path, name: str = "run.lock"):
        code = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO)!r})
            from mesh_transformer import run_lock
            lock = run_lock.acquire({str(folder)!r}, owner="holder-test", name={name!r})
            print("held", flush=True)
            time.sleep(60)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------------------------ 1. one owner
def test_second_device_train_on_a_held_model_dir_stops_naming_the_holder(tmp_path, data, capsys):
    import device_train
    config = _config(tmp_path, data)
    holder = Holder(tmp_path / "ckpt")
    try:
        rc, err = call(device_train.main, ["--config", config, "--no-progress"], capsys)
    finally:
        holder.stop()
    line = error_line(err)
    assert rc == 1 and "in use" in line and f"pid {holder.proc.pid}" in line and "holder-test" in line
    assert not (tmp_path / "ckpt" / "meta.json").exists() and not (tmp_path / "ckpt" / "metrics.jsonl").exists()


def test_second_iteration_train_on_a_held_out_dir_stops_naming_the_holder(tmp_path, capsys):
    import iteration_train
    holder = Holder(tmp_path / "out")
    try:
        rc, err = call(iteration_train.main, ["--out-dir", tmp_path / "out", "--dry_run", "--no-progress"], capsys)
    finally:
        holder.stop()
    line = error_line(err)
    assert rc == 1 and "--out-dir" in line and f"pid {holder.proc.pid}" in line
    assert not (tmp_path / "out" / "run_config.json").exists()


def test_stale_lock_of_a_dead_process_is_broken(tmp_path, caplog):
    holder = Holder(tmp_path)
    holder.stop()  # SIGKILL: the lock file stays behind
    assert run_lock.holder_of(str(tmp_path))["pid"] == holder.proc.pid
    with run_lock.acquire(str(tmp_path)) as lock:
        assert run_lock.holder_of(str(tmp_path))["pid"] == os.getpid()
        assert "stale" in caplog.text
    assert lock.released and run_lock.holder_of(str(tmp_path)) is None


def test_gcs_lock_is_a_generation_match_object(gcs_bucket):  # noqa: F811
    folder = f"gs://{gcs_bucket}/run"
    with run_lock.acquire(folder, owner="first"):
        with pytest.raises(run_lock.LockError, match=r"held by first \(pid"):
            run_lock.acquire(folder, owner="second")
    with run_lock.acquire(folder, owner="third"):  # released: free again
        pass


from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401  (pytest fixtures)


class _FakeBlob:
    """A GCS object with real precondition semantics (the emulator ignores if_generation_match)."""
    store: dict = {}
    mutex = threading.Lock()

    def __init__(self, name):
        self.name, self.generation = name, None

    def exists(self):
        return False  # as if two writers both looked before either wrote: only the precondition decides

    def upload_from_string(self, data, content_type=None, if_generation_match=None):
        from google.api_core import exceptions as gexc
        assert if_generation_match == 0
        with self.mutex:
            if self.name in self.store:
                raise gexc.PreconditionFailed("generation mismatch")
            self.generation = len(self.store) + 1
            self.store[self.name] = (data, self.generation)

    def download_as_bytes(self):
        data, self.generation = self.store[self.name]
        return data.encode()

    def delete(self, if_generation_match=None):
        with self.mutex:
            if self.store[self.name][1] == if_generation_match:
                del self.store[self.name]


def test_gcs_lock_precondition_lets_exactly_one_of_two_racers_win(monkeypatch):
    monkeypatch.setattr(run_lock, "_gcs_blob", _FakeBlob)
    for round_ in range(20):
        barrier, results = threading.Barrier(2), []

        def racer():
            barrier.wait()
            try:
                results.append(run_lock.acquire(f"gs://b/run_{round_}", owner="racer"))
            except run_lock.LockError as e:
                results.append(str(e))
        threads = [threading.Thread(target=racer) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        won = [r for r in results if isinstance(r, run_lock.RunLock)]
        assert len(won) == 1 and "held by racer" in [r for r in results if isinstance(r, str)][0]
        won[0].release()
        assert f"run_{round_}/run.lock" not in "".join(_FakeBlob.store)


# ------------------------------------------------------------------------------------------------ races
RACER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from mesh_transformer import run_lock
    folder, start = sys.argv[2], float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    try:
        lock = run_lock.acquire(folder, owner="racer")
    except run_lock.LockError as e:
        print("lost", e)
        sys.exit(1)
    with open(folder + "/owners.txt", "a") as f:   # what a run writes: one line per run
        f.write("run\\n")
    time.sleep(0.15)
    lock.release()
    print("won")
""")


def test_two_processes_racing_on_one_folder_20_times_exactly_one_runs(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    for round_ in range(20):
        folder = tmp_path / f"round_{round_}"
        folder.mkdir()
        start = time.time() + 0.25
        procs = [subprocess.Popen([sys.executable, str(script), str(REPO), str(folder), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=30) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 1], (round_, outs)
        assert (folder / "owners.txt").read_text() == "run\n"
        assert not (folder / run_lock.LOCK_NAME).exists()


def test_two_threads_racing_on_one_folder_20_times_exactly_one_runs(tmp_path):
    for round_ in range(20):
        barrier, results = threading.Barrier(2), []

        def racer():
            barrier.wait()
            try:
                lock = run_lock.acquire(str(tmp_path / f"r{round_}"))
            except run_lock.LockError:
                results.append("lost")
                return
            results.append("won")
            time.sleep(0.02)
            lock.release()
        threads = [threading.Thread(target=racer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["lost", "won"], round_


def test_two_create_finetune_tfrecords_started_together_3_times(tmp_path):
    from cli_helpers import generated_text
    src = tmp_path / "text"
    src.mkdir()
    (src / "a.txt").write_text(generated_text(4000, seed=3))
    env = cli_env(1)
    for round_ in range(3):
        out = tmp_path / f"out_{round_}"
        args = [str(REPO / "create_finetune_tfrecords.py"), str(src), "data", "--output-dir", str(out),
                "--tokenizer", "byte", "--seq-len", "32"]
        procs = [subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert sorted(p.returncode for p in procs) == [0, 1], outs
        loser = outs[[p.returncode for p in procs].index(1)][1]
        assert "is in use" in loser and "create_finetune_tfrecords.py (pid" in loser and "Traceback" not in loser
        files = sorted(p.name for p in out.iterdir())
        assert len(files) == 2 and files[0] == "data.index" and files[1].startswith("data_"), files


def test_two_device_train_started_together_one_runs(tmp_path, data, tmp_path_factory):
    config = write_config(tmp_path / "cfg.json", **{**KEYS, "train_set": data["index"], "total_steps": 4,
                                                    "model_dir": str(tmp_path / "ckpt")})
    env = cli_env(2, tmp_path_factory.getbasetemp() / "xla_cache")
    args = [str(REPO / "device_train.py"), "--config", config, "--no-progress"]
    procs = [subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 1], [o[1][-2000:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(1)][1]
    assert "model_dir" in loser and "is in use" in loser
    assert [m["step"] for m in read_metrics(tmp_path / "ckpt" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["checkpoints"] == [2, 4]


# ------------------------------------------------------------------------------------------------ 2. identity
@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, ) -> dict:
    """A model_dir trained 3 steps in-process (checkpoints 2 and 3)."""
    import device_train
    root = tmp_path_factory.mktemp("trained")
    config = _config(root, data)
    assert run_main(device_train.main, ["--config", config, "--no-progress"]) == 0
    return {"root": root, "config": config, "ckpt": root / "ckpt"}


def test_rerun_with_other_config_refuses_listing_the_difference(trained, tmp_path, capsys):
    import device_train
    raw = json.loads(pathlib.Path(trained["config"]).read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**raw, "lr": 1e-3, "total_steps": 4}))
    before = (trained["ckpt"] / "meta.json").read_text()
    rc, err = call(device_train.main, ["--config", other, "--no-progress"], capsys)
    line = error_line(err)
    assert rc == 1 and "config.lr: 0.003 -> 0.001" in line and "--force-new" in line and "--resume-anyway" in line
    assert (trained["ckpt"] / "meta.json").read_text() == before
    # the same settings resume (nothing left to do: total_steps reached)
    rc, err = call(device_train.main, ["--config", trained["config"], "--no-progress"], capsys)
    assert rc == 0, err


def test_force_new_starts_over_and_resume_anyway_records_the_difference(trained, tmp_path, capsys):
    import shutil

    import device_train
    raw = json.loads(pathlib.Path(trained["config"]).read_text())
    for flag in ("--force-new", "--resume-anyway"):
        folder = tmp_path / flag.strip("-")
        shutil.copytree(trained["ckpt"], folder)
        config = tmp_path / "cfg.json"
        config.write_text(json.dumps({**raw, "model_dir": str(folder), "lr": 1e-3, "total_steps": 4}))
        rc, err = call(device_train.main, ["--config", config, "--no-progress", flag], capsys)
        assert rc == 0, err
        identity = json.loads((folder / "run_identity.json").read_text())
        assert identity["fields"]["config"]["lr"] == 1e-3
        steps = [m["step"] for m in read_metrics(folder / "metrics.jsonl")]
        if flag == "--force-new":  # started over: four new steps, the old checkpoints gone
            assert steps == [1, 2, 3, 4] and not (folder / "step_3").exists() and identity["history"] == []
        else:  # resumed at step 3 with the new lr, the difference recorded
            assert steps == [1, 2, 3, 4] and (folder / "step_3").exists()
            assert "config.lr: 0.003 -> 0.001" in identity["history"][0]["resumed_anyway_with"]


def test_meta_json_missing_refuses_then_recover_meta_resumes(trained, tmp_path, capsys):
    import shutil

    import device_train
    folder = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], folder)
    (folder / "meta.json").unlink()
    raw = json.loads(pathlib.Path(trained["config"]).read_text())
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**raw, "model_dir": str(folder), "total_steps": 4}))
    step3 = sorted((folder / "step_3" / "shard_0").iterdir())[0].read_bytes()
    rc, err = call(device_train.main, ["--config", config, "--no-progress"], capsys)
    line = error_line(err)
    assert rc == 1 and "meta.json is missing" in line and "--recover-meta" in line and "step folders [2, 3]" in line
    assert sorted((folder / "step_3" / "shard_0").iterdir())[0].read_bytes() == step3  # not overwritten
    rc, err = call(device_train.main, ["--config", config, "--no-progress", "--recover-meta"], capsys)
    assert rc == 0, err
    metrics = read_metrics(folder / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # resumed at 3: one more step, nothing redone
    assert ckpt.latest_step(str(folder)) == 4


def _fake_answers(path: pathlib.Path) -> None:
    from star.tasks import get_task
    task = get_task("arithmetic")
    lines = [json.dumps({"id": ex.id, "key": ex.id, "class": task.answer_classes(ex), "question": "",
                         "completion": "", "pred": ex.gold, "gold": ex.gold, "correct": True, "rationalized": False,
                         "steps_ok": None}) for ex in task.load("dev")]
    path.write_text("\n".join(lines) + "\n")


def test_device_inference_never_resumes_another_checkpoints_answers(tmp_path, capsys):
    import device_inference
    cfg = load_config({**TINY, "cores_per_replica": 1})
    config = write_config(tmp_path / "cfg.json", cores_per_replica=1)
    state = _train_state(cfg)
    ckpt.save_checkpoint(str(tmp_path / "a"), state.params, 0, cfg)
    ckpt.save_checkpoint(str(tmp_path / "b"), state.params, 0, cfg)
    answers = tmp_path / "dev_answers.jsonl"
    _fake_answers(answers)  # answers of an unknown checkpoint (all "correct")
    argv = ["--config", config, "--dataset_mode", "arithmetic", "--split", "dev", "--out", answers]
    rc, err = call(device_inference.main, [*argv, "--ckpt", tmp_path / "a"], capsys)
    line = error_line(err)
    assert rc == 1 and "recorded no identity" in line and "--force-new" in line
    # adopted explicitly as checkpoint a's, then checkpoint b is refused
    rc, err = call(device_inference.main, [*argv, "--ckpt", tmp_path / "a", "--resume-anyway"], capsys)
    assert rc == 0, err
    rc, err = call(device_inference.main, [*argv, "--ckpt", tmp_path / "b"], capsys)
    line = error_line(err)
    assert rc == 1 and "checkpoint.path" in line and str(tmp_path / "b") in line


def test_iteration_train_rerun_with_other_flags_refuses(tmp_path, capsys):
    import iteration_train
    out = tmp_path / "out"
    # a finished run: iteration 0 (the base evaluated on 4 dev sums) and no further iteration
    base = ["--out-dir", out, "--n_iters", "0", "--no-progress", "--base_model_location", "random", "--max_digits",
            "2", "--n_dev_per_digit", "2", "--gen_length", "4", "--eval_batch_size", "4"]
    rc, err = call(iteration_train.main, [*base, "--n_train_samples", "8"], capsys)
    assert rc == 0, err
    run_config = (out / "run_config.json").read_text()
    rc, err = call(iteration_train.main, [*base, "--n_train_samples", "9"], capsys)
    line = error_line(err)
    assert rc == 1 and "options.n_train_samples: 8 -> 9" in line
    assert (out / "run_config.json").read_text() == run_config  # not overwritten
    rc, err = call(iteration_train.main, [*base, "--n_train_samples", "9", "--resume-anyway"], capsys)
    assert rc == 0, err
    history = json.loads((out / "run_identity.json").read_text())["history"]
    assert "options.n_train_samples: 8 -> 9" in history[0]["resumed_anyway_with"]


def test_start_iter_on_an_empty_folder_refuses(tmp_path, capsys):
    import iteration_train
    rc, err = call(iteration_train.main, ["--out-dir", tmp_path / "out", "--dry_run", "--start_iter", "3",
                                          "--base_model_location", "random", "--no-progress"], capsys)
    line = error_line(err)
    assert rc == 1 and "--start_iter 3" in line and "1, 2" in line


# ------------------------------------------------------------------------------------------------ 3. no garbage
def test_nan_params_stop_training_before_any_checkpoint(tmp_path, data, capsys):
    import device_train
    cfg = load_config({**TINY, **KEYS})
    state = _train_state(cfg)
    state.params["layers/block/q"]["w"][0, 0, 0] = np.nan
    ckpt.save_checkpoint(str(tmp_path / "nan_base"), state, 0, cfg)
    config = _config(tmp_path, data)
    rc, err = call(device_train.main, ["--config", config, "--no-progress", "--tune-model-path",
                                       tmp_path / "nan_base"], capsys)
    line = error_line(err)
    assert rc == 1 and "training stopped at step 1" in line and "starting params" in line
    assert "no checkpoint was written" in line
    assert not (tmp_path / "ckpt" / "meta.json").exists() and not list((tmp_path / "ckpt").glob("step_*"))


def test_divergence_keeps_the_last_good_checkpoint_latest(tmp_path, data, capsys):
    import device_train
    config = _config(tmp_path, data, lr=1e30, end_lr=1e30, warmup_steps=0, ckpt_every=1, total_steps=6)
    rc, err = call(device_train.main, ["--config", config, "--no-progress"], capsys)
    line = error_line(err)
    assert rc == 1 and "training stopped at step" in line
    stopped = int(line.split("training stopped at step ")[1].split(":")[0])
    latest = ckpt.latest_step(str(tmp_path / "ckpt"))
    assert latest == stopped - 1 and f"stays step {latest}" in line
    assert not (tmp_path / "ckpt" / f"step_{stopped}").exists()
    # metrics.jsonl is strict JSON: the bad figures and CPU's unknown MFU are null, never a bare NaN token
    text = (tmp_path / "ckpt" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def strict(token):
        raise ValueError(token)
    records = [json.loads(x, parse_constant=strict) for x in text.splitlines()]
    assert records[-1]["step"] == stopped and records[-1]["mfu"] is None


def test_token_ids_beyond_n_vocab_are_named_at_the_record(tmp_path, capsys):
    import device_train
    from tfrecord_utils.records import write_index, write_token_records
    rows = [list(range(33))] * 6 + [[1] * 20 + [300] + [1] * 12] + [list(range(33))] * 9
    write_token_records(tmp_path / "d_16.tfrecords", rows)
    write_index(tmp_path / "d.index", ["d_16.tfrecords"])
    config = write_config(tmp_path / "cfg.json", **{**KEYS, "train_set": str(tmp_path / "d.index"),
                                                    "model_dir": str(tmp_path / "ckpt")})
    rc, err = call(device_train.main, ["--config", config, "--no-progress"], capsys)
    line = error_line(err)
    assert rc == 1 and "d.index" in line and "d_16.tfrecords: record 6" in line and "token id 300" in line
    assert "n_vocab=264" in line and ckpt.latest_step(str(tmp_path / "ckpt")) is None


def test_truncated_tfrecord_is_refused_when_opened(tmp_path, data):
    from tfrecord_utils.loader import TFRecordLoader
    from tfrecord_utils.records import write_index, write_token_records
    write_token_records(tmp_path / "t_8.tfrecords", [list(range(33))] * 8)
    raw = (tmp_path / "t_8.tfrecords").read_bytes()
    (tmp_path / "t_8.tfrecords").write_bytes(raw[:len(raw) * 4 // 8 + 7])  # cut inside record 4
    write_index(tmp_path / "t.index", ["t_8.tfrecords"])
    loader = TFRecordLoader(tmp_path / "t.index", batch_shape=(1,), seq=32)
    with pytest.raises(ValueError, match=r"t_8.tfrecords: record 4 \(0-based\): truncated"):
        next(loader)  # before its first record is used
    write_token_records(tmp_path / "u_9.tfrecords", [list(range(33))] * 8)  # whole records, but fewer than named
    write_index(tmp_path / "u.index", ["u_9.tfrecords"])
    with pytest.raises(ValueError, match="holds 8 records but its name says 9"):
        next(TFRecordLoader(tmp_path / "u.index", batch_shape=(1,), seq=32))


def test_damaged_latest_step_falls_back_naming_the_file(tmp_path, caplog):
    cfg = load_config({**TINY, **KEYS})
    state = _train_state(cfg)
    for step in (2, 4):
        ckpt.save_checkpoint(str(tmp_path), state._replace(step=np.asarray(step, np.int32)), step, cfg,
                             aux={"train_loader": {"step": step}})
    bad = tmp_path / "step_4" / "shard_1" / "7.npz"
    bad.write_bytes(bad.read_bytes()[:100])
    params, opt, step, aux = ckpt.load_checkpoint(str(tmp_path), cfg)  # a reader: falls back, changes nothing
    assert step == 2 and aux == {"train_loader": {"step": 2}} and opt is not None
    assert str(bad) in caplog.text
    assert json.loads((tmp_path / "meta.json").read_text())["checkpoints"] == [2, 4]
    assert ckpt.load_checkpoint(str(tmp_path), cfg, forget_bad=True)[2] == 2  # training: also un-lists step 4
    assert json.loads((tmp_path / "meta.json").read_text())["checkpoints"] == [2]  # step 4 will be trained again


# ------------------------------------------------------------------------------------------------ 4. checked values
def test_string_and_nan_config_values_are_refused(tmp_path, data, capsys):
    import device_train
    for key, value, want in [("lr", "0.1", "'lr' must be a number"), ("lr", float("nan"), "'lr' must be a number"),
                             ("ckpt_every", -1, "'ckpt_every' must be >= 0"),
                             ("total_steps", -5, "'total_steps' must be >= 0")]:
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**TINY, **KEYS, key: value, "train_set": data["index"],
                                    "model_dir": str(tmp_path / "ckpt")}))
        rc, err = call(device_train.main, ["--config", path, "--no-progress"], capsys)
        assert rc == 1 and want in error_line(err) and str(path) in error_line(err), (key, err)


def test_error_line_starts_its_own_line_after_a_progress_bar(capsys):
    from tqdm.auto import tqdm

    def main(argv):
        bar = tqdm(total=10, desc="work")
        bar.update(3)
        raise ValueError("something named went wrong")
    assert run_main(main, []) == 1
    err = capsys.readouterr().err
    assert "\nerror: something named went wrong" in err


def test_create_finetune_tfrecords_checks_its_output_folder_before_reading(tmp_path, capsys, monkeypatch):
    import create_finetune_tfrecords
    from tfrecord_utils import build
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello " * 100)
    (tmp_path / "taken").write_text("a file where the output folder should be")

    def must_not_read(path):
        raise AssertionError("the input was read before the output folder was checked")
    monkeypatch.setattr(build, "read_texts", must_not_read)
    rc, err = call(create_finetune_tfrecords.main, [tmp_path / "in", "x", "--output-dir", tmp_path / "taken",
                                                    "--tokenizer", "byte"], capsys)
    line = error_line(err)
    assert rc == 1 and "--output-dir" in line and "is a file" in line
