"""attention_impl "blocked" (mesh_transformer/attention.py) == "xla" (the whole causal square): logits and the
gradients of the training loss w.r.t. every param, on tiny GPT-J and Llama-family models, at lengths that are and
are not multiples of the block, shorter than one block, with grouped-query heads, a sliding window and left padding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.attention import blocked_attention
from mesh_transformer.config import ConfigError, load_config
from mesh_transformer.layers import KVSegment, causal_mask, resolve_attention_impl, segment_attention
from mesh_transformer.model import CausalTransformer, masked_lm_loss
from mesh_transformer.run_identity import config_fields

from helpers import left_pad, random_params

GPTJ = dict(layers=2, d_model=64, n_heads=4, n_vocab=256, seq=64, pe_rotary_dims=8, compute_dtype="float32")
LLAMA = dict(GPTJ, model_type="llama", n_heads=8, n_kv_heads=2, d_ff=96, pe_rotary_dims=None)  # G = 4
MISTRAL = dict(LLAMA, model_type="mistral", sliding_window=5)


def _models(raw, block):
    xla = CausalTransformer(load_config(dict(raw, attention_impl="xla")))
    blocked = CausalTransformer(load_config(dict(raw, attention_impl="blocked", attention_block_size=block)))
    return xla, blocked


def _batch(t, pad):
    """tokens, token_valid, positions [2, t]: row 0 left-padded by `pad` tokens, row 1 full."""
    rng = np.random.default_rng(t)
    rows = [list(rng.integers(3, 256, t - pad)), list(rng.integers(3, 256, t))]
    tokens, valid, positions = left_pad(rows, t)
    return jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(positions)


def _logits_and_grads(model, params, tokens, valid, positions):
    def loss(p):
        logits = model.forward(p, tokens, positions, valid)[0]  # [B, T, V]
        return masked_lm_loss(logits[:, :-1], tokens[:, 1:], valid[:, 1:], model.config.z_loss)[0], logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


def _assert_close(got, ref, rtol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("raw, t, block, pad", [
    (GPTJ, 37, 16, 0),  # T not a multiple of the block: the last block has 5 rows
    (GPTJ, 10, 64, 4),  # T shorter than one block, left padding
    (LLAMA, 24, 8, 7),  # grouped-query attention (8 heads, 2 kv heads), left padding
    (MISTRAL, 21, 8, 3),  # a sliding window of 5 < T, GQA, left padding, a short last block
], ids=["gptj-T37-b16", "gptj-T10-b64-pad", "llama-gqa-T24-b8-pad", "mistral-window5-T21-b8-pad"])
def test_blocked_logits_and_gradients_equal_xla_fp32(raw, t, block, pad):
    xla, blocked = _models(raw, block)
    params = random_params(xla)
    tokens, valid, positions = _batch(t, pad)
    ref_logits, ref_grads = _logits_and_grads(xla, params, tokens, valid, positions)
    logits, grads = _logits_and_grads(blocked, params, tokens, valid, positions)
    _assert_close(logits, ref_logits, 1e-5)  # the padding rows too (a uniform softmax, as the square's)
    jax.tree.map(lambda a, b: _assert_close(a, b, 1e-4), grads, ref_grads)


def test_blocked_equals_xla_bf16_loosely():
    xla, blocked = _models(dict(LLAMA, compute_dtype="bfloat16"), 8)
    params = random_params(xla)
    tokens, valid, positions = _batch(27, 5)
    ref_logits, ref_grads = _logits_and_grads(xla, params, tokens, valid, positions)
    logits, grads = _logits_and_grads(blocked, params, tokens, valid, positions)
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 3e-2
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b) + 1e-6


def test_blocked_core_equals_segment_attention_with_a_fully_masked_row():
    """The core alone, against layers.segment_attention + causal_mask: a row that sees no key gets the square's
    uniform softmax over all T keys (not NaN, not the mean over its own block), and its gradients match too."""
    rng = np.random.default_rng(0)
    b, t, h, hkv, dh = 2, 19, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)  # [B, T, H, Dh]
    k = jnp.asarray(rng.normal(size=(b, t, hkv, dh)), jnp.float32)  # [B, T, Hkv, Dh]
    v = jnp.asarray(rng.normal(size=(b, t, hkv, dh)), jnp.float32)
    valid = jnp.asarray(np.arange(t)[None] >= np.array([[9], [0]]))  # row 0: 9 padding tokens (past block 0)
    positions = jnp.asarray(np.maximum(np.cumsum(np.asarray(valid), 1) - 1, 0))
    w = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)

    def square(q, k, v):
        seg = KVSegment(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), causal_mask(valid, positions, 4))
        return segment_attention(q, [seg])

    for custom_vjp in (True, False):
        def blocked(q, k, v):
            return blocked_attention(q, k, v, valid, positions, 4, 4, custom_vjp=custom_vjp)

        _assert_close(blocked(q, k, v), square(q, k, v), 1e-5)
        got = jax.grad(lambda *a: jnp.sum(blocked(*a) * w), argnums=(0, 1, 2))(q, k, v)
        ref = jax.grad(lambda *a: jnp.sum(square(*a) * w), argnums=(0, 1, 2))(q, k, v)
        for a, r in zip(got, ref):
            _assert_close(a, r, 1e-4)


def test_auto_is_blocked_on_cpu_block_size_is_validated_and_neither_is_in_run_identity():
    assert jax.default_backend() == "cpu" and resolve_attention_impl("auto") == "blocked"
    assert resolve_attention_impl("xla") == "xla"
    assert load_config(GPTJ).attention_block_size == 64
    with pytest.raises(ConfigError, match="attention_block_size"):
        load_config(dict(GPTJ, attention_block_size=0))
    with pytest.raises(ConfigError, match="attention_impl"):
        load_config(dict(GPTJ, attention_impl="flash"))
    # the same math to fp32 rounding: a run folder resumes across implementations (as across remat policies)
    assert not {"attention_impl", "attention_block_size"} & set(config_fields(load_config(GPTJ)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_computed_once_is_the_identity_bit_for_bit_and_in_its_gradient(dtype):
    """`_computed_once` divides by a 1.0 XLA cannot fold (to stop it recomputing the rotary per block): the values,
    -0.0, infinities and NaN come back unchanged, compiled, and the cotangent passes through unchanged too."""
    from mesh_transformer.attention import _computed_once

    x = jnp.asarray([0.0, -0.0, 1.5, -3.25e-3, 6.5e4, 1e-30, np.inf, -np.inf, np.nan], dtype)
    got = jax.jit(_computed_once)(x)
    assert got.dtype == x.dtype
    bits = jnp.uint16 if dtype == jnp.bfloat16 else jnp.uint32  # compared as bit patterns: -0.0 and NaN included
    np.testing.assert_array_equal(np.asarray(got.view(bits)), np.asarray(x.view(bits)))
    g = jnp.asarray(np.linspace(-2, 2, x.size), dtype)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vjp(_computed_once, x)[1])(g)[0]), np.asarray(g))
