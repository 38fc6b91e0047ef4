"""The Llama family on ('dp','mp') meshes of 8 CPU devices: kv heads split over mp when it divides them, replicated
otherwise; loss and gradients sharded == unsharded (rtol 1e-5), and the sampler's greedy tokens likewise."""
import jax
import numpy as np
import pytest

from mesh_transformer import sharding
from mesh_transformer.model import CausalTransformer
from mesh_transformer.sampling import Sampler

CFG = dict(model_type="llama", layers=2, d_model=64, n_heads=8, n_kv_heads=2, n_vocab=256, seq=16, d_ff=128,
           compute_dtype="float32", qkv_bias=True, rope_scaling=dict(rope_type="llama3", factor=8.0,
           low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8), sliding_window=6)
B, T = 8, 16
# (dp, mp, n_kv_heads): kv heads that mp divides (2 over 2, 4 over 4, any over 1) and that it does not (2 over 4)
CASES = [(1, 2, 2), (2, 4, 2), (2, 4, 4), (8, 1, 2)]


def _setup(kv):
    model = CausalTransformer(dict(CFG, n_kv_heads=kv))
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    batch = (rs.randint(0, 256, (B, T)).astype(np.int32), rs.randint(0, 256, (B, T)).astype(np.int32),
             (rs.rand(B, T) > 0.3).astype(np.float32))

    def loss_and_grads(params, tokens, targets, mask):
        (loss, aux), grads = jax.value_and_grad(model.loss, has_aux=True)(params, tokens, targets, mask, True)
        return loss, grads
    return model, params, batch, jax.jit(loss_and_grads)


@pytest.mark.parametrize("dp,mp,kv", CASES, ids=str)
def test_sharded_loss_and_grads_equal_unsharded(dp, mp, kv):
    model, params, batch, fn = _setup(kv)
    with jax.default_device(jax.devices()[0]):
        ref = jax.device_get(fn(params, *batch))
    mesh = sharding.make_mesh(mp, devices=jax.devices()[:dp * mp])
    replicated = sharding.replicate_kv(model.config, mesh)
    assert replicated == (kv % mp != 0)
    placed = sharding.shard_params(params, mesh, replicated)
    k_spec = placed["layers/block/k"]["w"].sharding.spec
    assert k_spec == (sharding.P(None, None, None) if replicated else sharding.P(None, None, "mp"))
    got = jax.device_get(fn(placed, *[jax.device_put(x, sharding.named(mesh, sharding.batch_spec(2)))
                                      for x in batch]))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1], ref[1])


def test_sampler_on_a_mesh_with_replicated_kv_heads_equals_one_device():
    model, params, _, _ = _setup(2)
    prompts = [[5, 17, 99], [200, 3, 3, 8, 41, 77], [7] * 8, [11, 12]]
    one = Sampler(model, params).sample(prompts, 6, prefix=[1, 2, 3])
    mesh = Sampler(model, params, sharding.make_mesh(4))  # dp 2 x mp 4: 2 kv heads replicated over mp
    out = mesh.sample(prompts, 6, prefix=[1, 2, 3])
    np.testing.assert_array_equal(out.tokens, one.tokens)
    np.testing.assert_allclose(out.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)


def test_family_config_errors_and_v1_layout_refusal(tmp_path):
    from mesh_transformer import checkpoint as ck
    from mesh_transformer.config import ConfigError, from_dict
    base = dict(layers=1, d_model=32, n_heads=4, n_vocab=64, seq=16)
    with pytest.raises(ConfigError, match="'sliding_window' is set but model_type is 'gptj'"):
        from_dict(dict(base, sliding_window=4))
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=4"):
        from_dict(dict(base, model_type="llama", n_kv_heads=3))
    with pytest.raises(ConfigError, match="'model_type' is 'gpt2'"):
        from_dict(dict(base, model_type="gpt2"))
    with pytest.raises(ConfigError, match="rope_scaling.*lacks"):
        from_dict(dict(base, model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    model = CausalTransformer(dict(base, model_type="llama", compute_dtype="float32"))
    from mesh_transformer import mtj_layout
    with pytest.raises(ValueError, match="no mesh-transformer-jax v1 checkpoint layout"):
        mtj_layout.require_gptj(model.config)
    ck.save_checkpoint(str(tmp_path), model.init(jax.random.PRNGKey(0)), 0, model.config)  # an HF step instead
    assert (tmp_path / "step_0" / "config.json").is_file() and not (tmp_path / "step_0" / "shard_0").exists()
