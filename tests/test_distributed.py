"""Multi-process training through jax.distributed on this machine: 2 processes x 4 CPU devices on 127.0.0.1.

- 5 steps on a (2,4) and on an (8,1) global mesh, and on (2,4) with ZeRO sharding (state split over dp too), give
  the losses of one process with 8 devices (fp32, rtol 1e-5), with metrics written by process 0 alone;
- the checkpoint the 2 processes write (each its shard folders, process 0 committing; ZeRO's dp-split leaves
  resharded leaf by leaf to the file layout first) loads in one process bit-exactly (params, Adam state, loader
  position) to the state they held;
- process 1 SIGKILLed right after writing its first shard file of step 4 on a (1,8) mesh (where each process writes
  4 of the 8 shard folders): meta.json still names step 2, and both processes restarted resume there and end with
  the losses of the uninterrupted run (the redone steps bit-exactly, the whole run within rtol 1e-5 of one process).
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from cli_helpers import make_dataset, read_metrics, write_config, xla_cache_dir
from dist_helpers import DIST_TINY, DIST_TRAIN, GLOBAL_BATCH, logs, two_process_run
from mesh_transformer import checkpoint as ckpt
from mesh_transformer.config import load_config

STEPS = 5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    index = make_dataset(root / "data", "train", n_docs=300, seed=3)
    return {"root": root, "index": index, "cache": xla_cache_dir(tmp_path_factory)}


def _config(work, name: str, dp: int, mp: int, **keys) -> str:
    keys = {**DIST_TRAIN, "cores_per_replica": mp, "per_replica_batch": GLOBAL_BATCH // dp, "total_steps": STEPS,
            "train_set": work["index"], "model_dir": str(work["root"] / name / "ckpt"), "name": name, **keys}
    (work["root"] / name).mkdir(exist_ok=True)
    return write_config(work["root"] / name / "config.json", **DIST_TINY, **keys)


def one_process_losses(config: str, tmp: pathlib.Path) -> list:
    """The reference: the same config trained in this (pytest) process on its 8 CPU devices."""
    from mesh_transformer.finetune import RunOptions, train
    cfg = load_config(config)
    cfg = cfg.replace(model_dir=str(tmp / "one_process"))
    losses = []
    train(cfg, RunOptions(progress=False), on_step=lambda step, rec: losses.append(rec["loss"]))
    return losses


def _losses(folder: pathlib.Path) -> list:
    return [m["loss"] for m in read_metrics(folder / "metrics.jsonl")]


@pytest.fixture(scope="module", params=[(2, 4, False), (8, 1, False), (2, 4, True)],
                ids=["mesh2x4", "mesh8x1", "mesh2x4_zero"])
def two_proc(request, work) -> dict:
    dp, mp, zero = request.param
    name = f"two_{dp}x{mp}" + ("_zero" if zero else "")
    config = _config(work, name, dp, mp, **({"zero": True} if zero else {}))
    out = work["root"] / name
    dump = str(out / "final_state.npz")
    codes = two_process_run(config, out, work["cache"], "run", dump=dump)
    assert codes == [0, 0], logs(out, "run")
    return {"config": config, "out": out, "dump": dump, "mesh": (dp, mp)}


@pytest.mark.timeout(900)
def test_two_processes_give_the_losses_of_one(two_proc, tmp_path):
    metrics = read_metrics(two_proc["out"] / "ckpt" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), "metrics.jsonl: one line per step (process 0)"
    got = np.array([m["loss"] for m in metrics])
    want = np.array(one_process_losses(two_proc["config"], tmp_path))
    print(f"mesh {two_proc['mesh']}: 2 processes {got.tolist()} vs 1 process {want.tolist()}")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.all(np.isfinite(got)) and got[-1] < got[0]


@pytest.mark.timeout(900)
def test_their_checkpoint_loads_in_one_process_bit_exactly(two_proc):
    cfg = load_config(two_proc["config"])
    params, opt_state, step, aux = ckpt.load_checkpoint(str(two_proc["out"] / "ckpt"), cfg)
    assert step == STEPS
    held = np.load(two_proc["dump"])
    from mesh_transformer.train import TrainState
    loaded = jax.tree_util.tree_leaves_with_path(TrainState(params, opt_state, np.asarray(step, np.int32)))
    assert len(loaded) == len(held.files)
    for path, value in loaded:
        key = jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(value), held[key], err_msg=key)
        assert np.asarray(value).dtype == held[key].dtype, key
    # the loader position is the global stream's: 5 steps x GA 2 x 8 sequences from the start
    loader = aux["train_loader"]
    assert loader["epoch"] == 0 and loader["file_idx"] == 0 and loader["record_idx"] == STEPS * 2 * GLOBAL_BATCH, loader
    shards = sorted(p.name for p in (two_proc["out"] / "ckpt" / f"step_{STEPS}").iterdir())
    assert shards == [f"shard_{s}" for s in range(two_proc["mesh"][1])]


CRASH_STEPS, CRASH_EVERY, CRASH_AT = 6, 2, 4


@pytest.mark.timeout(900)
def test_process_killed_mid_checkpoint_write_resumes_exactly(work, tmp_path):
    config = _config(work, "crash_1x8", 1, 8, total_steps=CRASH_STEPS, ckpt_every=CRASH_EVERY, keep_n=None)
    out = work["root"] / "crash_1x8"
    folder = out / "ckpt"
    codes = two_process_run(config, out, work["cache"], "first",
                            env_of={1: {"STAR_TEST_CRASH_AT_STEP": str(CRASH_AT)}})
    assert codes[1] == -9, logs(out, "first")
    assert ckpt.latest_step(str(folder)) == CRASH_AT - CRASH_EVERY, "meta.json must still name the last full step"
    written = sorted((folder / f"step_{CRASH_AT}").glob("shard_*/*.npz"))
    assert written and len(written) < 8 * 16, "the crash came in the middle of writing step 4"
    assert (folder / f"step_{CRASH_AT}" / "shard_4" / "0.npz").exists(), "process 1 wrote its first file first"
    interrupted = _losses(folder)
    assert len(interrupted) >= CRASH_AT

    codes = two_process_run(config, out, work["cache"], "again")
    assert codes == [0, 0], logs(out, "again")
    metrics = read_metrics(folder / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, CRASH_STEPS + 1)), "no step twice, none missing"
    resumed = [m["loss"] for m in metrics]
    assert resumed[:CRASH_AT] == interrupted[:CRASH_AT], "steps 3, 4 redone bit-exactly after the resume"
    assert json.loads((folder / "meta.json").read_text())["checkpoints"] == [2, 4, 6]
    want = one_process_losses(config, tmp_path)
    np.testing.assert_allclose(resumed, want, rtol=1e-5)


@pytest.mark.timeout(900)
def test_loading_into_shardings_reads_the_same_state(two_proc):
    """The multi-process resume's load (each device's parts read from the files, leaf by leaf, into the trainer's
    global shardings), run here in one process: the same bits as the host load."""
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.train import Trainer
    cfg = load_config(two_proc["config"])
    trainer = Trainer(cfg, mesh=make_mesh(cfg.cores_per_replica))
    path = str(two_proc["out"] / "ckpt")
    host = ckpt.load_checkpoint(path, cfg)
    placed = ckpt.load_checkpoint(path, cfg, shardings=trainer.shardings, param_dtype=trainer.param_dtype)
    assert placed[2:] == host[2:]
    for tree_placed, tree_host, shardings in ((placed[0], host[0], trainer.shardings.params),
                                              (placed[1], host[1], trainer.shardings.opt_state)):
        def check(x, y, s):
            if isinstance(x, jax.Array) and x.ndim:
                assert x.sharding.is_equivalent_to(s, x.ndim)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        jax.tree.map(check, tree_placed, tree_host, shardings)


@pytest.mark.parametrize("kwargs, named", [
    (dict(coordinator_address="127.0.0.1:1234"), "--num-processes, --process-id missing"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "--process-id must lie in 0 .. 1"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "HOST:PORT"),
])
def test_incomplete_distributed_flags_are_named(kwargs, named):
    from mesh_transformer import distributed
    with pytest.raises(ValueError, match=named):
        distributed.initialize(**kwargs)
    assert distributed.initialize() is False  # no flags: one process, nothing started
