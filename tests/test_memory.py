"""The memory planner (mesh_transformer/memory.py): XLA's figures of the real compiled functions on abstract shapes.

- per-device params / optimizer-state bytes are 1/mp of the whole for a split layout, and XLA's argument bytes of the
  train step are exactly the state plus the batch;
- the train step's outputs reuse the donated state (aliased bytes = state bytes);
- a sampler's temporaries grow with its batch (the KV cache is allocated inside it);
- a set-up over the devices' memory stops device_train.py with one `error:` line naming the knobs, before any data
  or checkpoint is read.
"""
from __future__ import annotations

import jax
import pytest

from cli_helpers import TINY, TRAIN_KEYS, cli_env, error_line, make_dataset, run_cli, write_config
from mesh_transformer import memory, sharding
from mesh_transformer.config import load_config
from mesh_transformer.sampling import Sampler
from mesh_transformer.train import Trainer

CFG = dict(TINY, **TRAIN_KEYS)


def _trainer(mp: int) -> Trainer:
    return Trainer(load_config(CFG).replace(cores_per_replica=mp), sharding.make_mesh(mp, jax.devices()[:mp]))


def test_train_step_figures_are_the_sharded_state():
    one, four = memory.training_usage(_trainer(1))[1], memory.training_usage(_trainer(4))[1]
    cfg = load_config(CFG)
    batch_bytes = 2 * cfg.gradient_accumulation_steps * cfg.per_replica_batch * (cfg.seq + 1) * 4  # tokens + mask
    for usage in (one, four):
        state = usage.detail["params"] + usage.detail["optimizer state"]
        assert usage.arguments == state + 4 + batch_bytes + 4  # + the step counter and the horizon (int32 each)
        assert usage.aliased >= state  # the new state is written over the donated one
        assert usage.peak >= usage.arguments
    # the split leaves (all but biases and LayerNorms) shrink 4x
    assert one.detail["params"] / 4 < four.detail["params"] < one.detail["params"] / 2


def test_sampler_temporaries_grow_with_the_batch():
    trainer = _trainer(1)
    sampler = Sampler(trainer.model, mesh=trainer.mesh)
    small = memory.sampling_usage(sampler, batch=2, prefix=0, prompt=8, new_tokens=8)
    large = memory.sampling_usage(sampler, batch=32, prefix=0, prompt=8, new_tokens=8)
    assert large.detail["KV cache"] == 16 * small.detail["KV cache"]
    assert large.temporaries > small.temporaries


def test_check_names_what_does_not_fit_and_the_knobs():
    usages = memory.training_usage(_trainer(1))
    assert "FITS" in memory.check(usages, capacity=64 * memory.GiB)
    with pytest.raises(ValueError, match="train step .* needs .* per device.*remat 'full'"):
        memory.check(usages, capacity=1024)


def test_device_train_stops_before_a_step_that_does_not_fit(tmp_path):
    index = make_dataset(tmp_path / "data", "train", n_docs=40, seed=1)
    config = write_config(tmp_path / "config.json", **TRAIN_KEYS, total_steps=2, train_set=index,
                          model_dir=str(tmp_path / "ckpt"))
    proc = run_cli("device_train.py", ["--config", config, "--no-progress"],
                   cli_env(2, STAR_DEVICE_MEMORY_GB="0.0001"))
    line = error_line(proc)
    assert "does not fit" in line and "train step" in line and "remat" in line
    assert not (tmp_path / "ckpt" / "meta.json").exists()


def test_no_train_without_a_sampler_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(["--config", "tiny", "--no-train"])
    assert e.value.code == 2 and "--sample-batch" in capsys.readouterr().err
