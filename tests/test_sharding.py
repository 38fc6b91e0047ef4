"""Megatron layout on a ('dp','mp') mesh of 8 CPU devices: params really are split the way mtj split them, and the
loss, gradients and one optimizer step computed sharded equal the unsharded ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mesh_transformer import sharding
from mesh_transformer.config import load_config
from mesh_transformer.model import CausalTransformer
from mesh_transformer.train import Trainer

from helpers import adam_mu, assert_same_first_step, random_params

# n_heads, n_vocab and d_ff divisible by 8, so every mesh below can split them
CFG = dict(layers=2, d_model=64, n_heads=8, n_vocab=256, seq=16, pe_rotary_dims=4, d_ff=128,
           compute_dtype="float32")
L, D, V, F, INNER = 2, 64, 256, 128, 64
B, T = 8, 16  # batch divisible by every dp size

# (dp, mp): devices used, cores_per_replica
MESHES = [(1, 1), (1, 2), (2, 4), (1, 8), (8, 1)]


def mesh_of(dp: int, mp: int):
    return sharding.make_mesh(mp, devices=jax.devices()[:dp * mp])


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) == 8, "conftest.py should give JAX 8 CPU devices"
    model = CausalTransformer(CFG)
    params = random_params(model, seed=0)
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, V, (B, T)).astype(np.int32)
    targets = rs.randint(0, V, (B, T)).astype(np.int32)
    mask = (rs.rand(B, T) > 0.3).astype(np.float32)

    def loss_and_grads(params, tokens, targets, mask):
        (loss, aux), grads = jax.value_and_grad(model.loss, has_aux=True)(params, tokens, targets, mask, True)
        return loss, aux["ce"], grads

    fn = jax.jit(loss_and_grads)
    with jax.default_device(jax.devices()[0]):
        ref = jax.device_get(fn(params, tokens, targets, mask))
    return dict(model=model, params=params, batch=(tokens, targets, mask), fn=fn, ref=ref)


def test_make_mesh_rejects_bad_mp():
    with pytest.raises(ValueError, match="cores_per_replica=3 must divide the number of devices"):
        sharding.make_mesh(3)


@pytest.mark.parametrize("dp,mp", MESHES, ids=lambda x: str(x))
def test_sharded_loss_and_grads_equal_unsharded(setup, dp, mp):
    mesh = mesh_of(dp, mp)
    assert dict(mesh.shape) == {"dp": dp, "mp": mp}
    params = sharding.shard_params(setup["params"], mesh)

    # the params are really split, mtj's way: heads / vocabulary / d_ff over 'mp', replicated over 'dp'
    expected = {
        ("embedding", "w"): (V // mp, D),
        ("embedding", "b"): (D,),
        ("layers/block/q", "w"): (L, D, INNER // mp),
        ("layers/block/k", "w"): (L, D, INNER // mp),
        ("layers/block/v", "w"): (L, D, INNER // mp),
        ("layers/block/out", "w"): (L, INNER // mp, D),
        ("layers/block/fc_in", "w"): (L, D, F // mp),
        ("layers/block/fc_in", "b"): (L, F // mp),
        ("layers/block/fc_out", "w"): (L, F // mp, D),
        ("layers/block/fc_out", "b"): (L, D),
        ("layers/block/ln", "scale"): (L, D),
        ("layers/block/ln", "offset"): (L, D),
        ("projection/ln_f", "scale"): (D,),
        ("projection/lm_head", "w"): (D, V // mp),
        ("projection/lm_head", "b"): (V // mp,),
    }
    seen = set()
    for mod, leaves in params.items():
        for name, arr in leaves.items():
            seen.add((mod, name))
            if (mod, name) not in expected:
                continue
            shards = arr.addressable_shards
            assert len(shards) == dp * mp
            for shard in shards:
                assert shard.data.shape == expected[(mod, name)], (mod, name, shard.data.shape)
            # each of the mp slices appears once per dp replica
            assert len({str(s.index) for s in shards}) == (mp if expected[(mod, name)] != arr.shape else 1)
    assert set(expected) <= seen

    tokens, targets, mask = setup["batch"]
    batch_sharding = NamedSharding(mesh, P("dp", None))
    batch = [jax.device_put(x, batch_sharding) for x in (tokens, targets, mask)]
    assert batch[0].addressable_shards[0].data.shape == (B // dp, T)
    loss, ce, grads = jax.device_get(setup["fn"](params, *batch))
    ref_loss, ref_ce, ref_grads = setup["ref"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(ce, ref_ce, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)


def test_train_step_2x4_equals_1x1():
    """One full Trainer step (grad accumulation, clipping, Adam, weight decay) on a (2, 4) mesh == on one device."""
    cfg = load_config({**CFG, "layers": 1, "gradient_accumulation_steps": 2, "warmup_steps": 0, "anneal_steps": 10,
                       "lr": 1e-3, "end_lr": 1e-4, "weight_decay": 0.1, "per_replica_batch": 2})
    params = random_params(CausalTransformer(cfg), seed=1)
    tokens = np.random.RandomState(1).randint(0, V, (2, 4, T + 1)).astype(np.int32)  # [GA, B, T+1]
    results = []
    for dp, mp in [(1, 1), (2, 4)]:
        trainer = Trainer(cfg, mesh_of(dp, mp))
        state = trainer.state_from_params(params)
        # params and Adam moments are both split over 'mp'
        assert state.params["layers/block/q"]["w"].addressable_shards[0].data.shape == (1, D, INNER // mp)
        assert adam_mu(state.opt_state)["layers/block/q"]["w"].addressable_shards[0].data.shape == (1, D, INNER // mp)
        state, metrics = trainer.train_step(state, {"tokens": tokens})
        results.append(jax.device_get((state.params, adam_mu(state.opt_state), metrics)))
    (p1, mu1, m1), (p8, mu8, m8) = results
    for key in ("loss", "ce", "grad_norm", "lr", "tokens"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    assert float(m1["lr"]) == pytest.approx(1e-3)  # warmup 0: the first step already moves the params
    moved = np.abs(p1["layers/block/q"]["w"] - params["layers/block/q"]["w"]).max()
    assert moved > 1e-4
    assert_same_first_step(p8, p1, mu8, mu1, lr=1e-3)
