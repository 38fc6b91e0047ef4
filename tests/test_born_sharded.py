"""State is born sharded: on 8 CPU devices, no leaf of a mid-sized config ever exists whole on one device during init,
checkpoint load, fine-tune start (params -> TrainState with a fresh optimizer) and sampler start.

How it is checked (each check fails on the code before the change, which ran `jax.jit(model.init)` and
`optimizer.init` unsharded and then resharded with `jax.device_put`):
- a spy on `jax.device_put` records every transfer whose input is a jax.Array living on ONE device, or whose target
  is one device, for a leaf the Megatron layout splits: the old `state_from_params` moved whole single-device params
  and Adam moments onto the mesh that way;
- `optimizer.init` must only ever see tracers (it runs inside a jit with out_shardings), never concrete arrays;
- every returned leaf has the planned NamedSharding, and each device holds 1/mp of every split leaf.
The memory planner's figures come from the same compiled functions (tests/test_memory.py).
"""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from mesh_transformer import checkpoint as ckpt
from mesh_transformer import sharding
from mesh_transformer import train as train_mod
from mesh_transformer.config import load_config
from mesh_transformer.sampling import Sampler

MID = dict(layers=2, d_model=256, n_heads=8, n_vocab=1024, seq=64, pe_rotary_dims=16, compute_dtype="bfloat16",
           cores_per_replica=8, per_replica_batch=1, gradient_accumulation_steps=1, warmup_steps=1, anneal_steps=10,
           lr=1e-3, end_lr=1e-4, weight_decay=0.1)


def _split(spec) -> bool:
    return any(axis is not None for axis in spec)


@pytest.fixture
def spy(monkeypatch):
    """Records whole-leaf single-device transfers and concrete optimizer.init calls."""
    seen = {"whole": [], "eager_opt_init": 0, "traced_opt_init": 0}
    real_put = jax.device_put

    def device_put(x, device=None, *args, **kwargs):
        for leaf in jax.tree.leaves(x):
            on_one = isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == 1 and leaf.size > 1024
            to_one = isinstance(device, jax.Device) or (
                hasattr(device, "device_set") and len(device.device_set) == 1)
            if (on_one or to_one) and getattr(leaf, "size", 0) > 1024:
                seen["whole"].append(tuple(leaf.shape))
        return real_put(x, device, *args, **kwargs)

    real_make = train_mod.make_optimizer

    def make_optimizer(cfg, anneal_steps=None):
        opt = real_make(cfg, anneal_steps)

        def init(params):
            traced = all(isinstance(p, jax.core.Tracer) for p in jax.tree.leaves(params))
            seen["traced_opt_init" if traced else "eager_opt_init"] += 1
            return opt.init(params)
        return optax.GradientTransformation(init, opt.update)

    monkeypatch.setattr(jax, "device_put", device_put)
    monkeypatch.setattr(train_mod, "make_optimizer", make_optimizer)
    return seen


def _assert_sharded_as_planned(tree, shardings, mp: int) -> None:
    for leaf, want in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.shape,
                                                                                                leaf.sharding)
        if _split(want.spec):
            shard = leaf.addressable_shards[0].data
            assert shard.size * mp == leaf.size, (leaf.shape, shard.shape)


def _trainer():
    cfg = load_config(MID)
    return cfg, train_mod.Trainer(cfg, sharding.make_mesh(8))


def test_init_creates_params_and_moments_in_their_shardings(spy):
    cfg, trainer = _trainer()
    state = trainer.init_state(jax.random.PRNGKey(0))
    _assert_sharded_as_planned(state, trainer.shardings, 8)
    assert spy["whole"] == [] and spy["eager_opt_init"] == 0 and spy["traced_opt_init"] >= 1


def test_fine_tune_start_from_params_makes_moments_under_jit(spy):
    cfg, trainer = _trainer()
    host = jax.tree.map(np.asarray, trainer.init_params(jax.random.PRNGKey(0)))  # e.g. an HF or slim checkpoint
    for params in (host, trainer.init_params(jax.random.PRNGKey(1))):  # host arrays, then device arrays
        state = trainer.state_from_params(params)
        _assert_sharded_as_planned(state, trainer.shardings, 8)
    assert spy["whole"] == [] and spy["eager_opt_init"] == 0


def test_checkpoint_load_goes_leaf_by_leaf_to_the_shards(spy, tmp_path):
    cfg, trainer = _trainer()
    state = trainer.init_state(jax.random.PRNGKey(0))
    ckpt.save_checkpoint(str(tmp_path / "ck"), state, 0, cfg, shards=8)
    params, opt_state, step, _ = ckpt.load_checkpoint(str(tmp_path / "ck"), cfg)
    resumed = trainer.state_from_params(params, opt_state, step)
    _assert_sharded_as_planned(resumed, trainer.shardings, 8)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(state))
    assert spy["whole"] == [] and spy["eager_opt_init"] == 0


def test_sampler_start_places_params_on_their_shards(spy):
    cfg, trainer = _trainer()
    sampler = Sampler(trainer.model, mesh=trainer.mesh)
    for params in (trainer.init_params(jax.random.PRNGKey(0)),
                   jax.tree.map(np.asarray, trainer.init_params(jax.random.PRNGKey(1)))):
        sampler.set_params(params)
        _assert_sharded_as_planned(sampler.params, sampler.param_shardings, 8)
        assert all(x.dtype == trainer.model.compute_dtype for x in jax.tree.leaves(sampler.params))
    assert spy["whole"] == []
