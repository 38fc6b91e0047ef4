"""Blocked causal attention for training and full forward passes (no KV cache): `attention_impl: "blocked"`.

Causal attention over T tokens computes a [B, H, T, T] score matrix of which the half above the diagonal is masked
out. This computes only the blocks on and below it: the queries are cut into blocks of `block` rows (a static
Python loop; the last block is short when `block` does not divide T), and query block i attends to keys
0..end of block i with one float32 softmax over those keys. At T = 256 and block 64 that is 62% of the scores; on
CPU, where the [B, H, T, T] fp32 softmax and its backward cost more than the model's matmuls, that is the saving.
The backward is a custom VJP that recomputes each block's probabilities from q and k instead of keeping them
(FlashAttention's recomputation, Dao et al. 2022, section 3.1), which also measured faster than autodiff of the loop
(BENCHMARKS.md, "Training").

Why hand-written: no library offers this for JAX on CPU. `jax.nn.dot_product_attention` computes the whole square
(its "xla" implementation) or needs cuDNN; the Pallas flash-attention kernels target TPU and GPU only.

The masking is exactly `layers.segment_attention` with `layers.causal_mask`: a masked score is replaced by
NEG_INF = -1e10, so a row with no visible key (a left-padding token) gets the uniform softmax over *all* T keys, not
NaN; here such a row's output is the mean of v over all T keys, which is what that softmax gives.

Shape glossary: B batch, T tokens, H query heads, Hkv key/value heads, G = H / Hkv query heads per kv head (query
head h reads kv head h // G, as HF's repeat_kv; the kv heads are never repeated in memory), Dh head dim,
Q rows of one query block, S keys it reads (S = end of the block).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .layers import NEG_INF


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the query blocks; the last one is short when block does not divide t."""
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _block_mask(token_valid: jax.Array, positions: jax.Array, window: Optional[int], start: int,
                stop: int) -> jax.Array:
    """[B, 1, 1, Q, S=stop]: rows start..stop-1 of `layers.causal_mask`, keys 0..stop-1."""
    tri = jnp.asarray(np.arange(stop)[None, :] <= np.arange(start, stop)[:, None])  # [Q, S]
    mask = tri[None] & token_valid[:, None, :stop]  # [B, Q, S]
    if window is not None:
        mask = mask & ((positions[:, start:stop, None] - positions[:, None, :stop]) < window)
    return mask[:, None, None]  # [B, 1, 1, Q, S]


def _probs(qb: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax(qb k^T / sqrt(Dh), masked) [B, Hkv, G, Q, S]; qb [B, Hkv, G, Q, Dh], k [B, Hkv, S, Dh]."""
    scale = 1.0 / math.sqrt(qb.shape[-1])
    s = jnp.einsum("bkgqd,bksd->bkgqs", qb, k, preferred_element_type=jnp.float32) * scale  # [B, Hkv, G, Q, S]
    return jax.nn.softmax(jnp.where(mask, s, NEG_INF), axis=-1)


def _pv(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, Hkv, G, Q, S] times v [B, Hkv, S, Dh] -> float32 [B, Hkv, G, Q, Dh]; groups and rows merged into one
    matmul dimension (the 5-d bf16 einsum with a float32 result is one XLA's CPU runtime rejects,
    layers._row_values)."""
    b, hkv, g, q, s = p.shape
    out = jnp.einsum("bkms,bksd->bkmd", p.astype(v.dtype).reshape(b, hkv, g * q, s), v,
                     preferred_element_type=jnp.float32)  # [B, Hkv, G*Q, Dh]
    return out.reshape(b, hkv, g, q, -1)


def _computed_once(x: jax.Array) -> jax.Array:
    """x, bit for bit (x / 1.0), but computed once. Every query block slices q and k, and XLA:CPU fuses a cheap
    producer such as the rotary embedding into each slice, recomputing it per block; it does not duplicate a
    division, so dividing by a 1.0 it cannot fold (behind an optimization barrier) makes it compute the rotary once
    and slice the result. Measured: ~7 ms of a ~350 ms demo training step (BENCHMARKS.md, "Training")."""
    return x / jax.lax.optimization_barrier(jnp.ones((), x.dtype))


def _forward(qh, kh, vh, token_valid, positions, window, block):
    """float32 [B, Hkv, G, T, Dh] attention output of rows that see at least one key (other rows: garbage, replaced
    by the caller). qh [B, Hkv, G, T, Dh]; kh, vh [B, Hkv, T, Dh]."""
    outs = []
    for start, stop in _blocks(qh.shape[3], block):
        mask = _block_mask(token_valid, positions, window, start, stop)  # [B, 1, 1, Q, S]
        p = _probs(qh[:, :, :, start:stop], kh[:, :, :stop], mask)  # [B, Hkv, G, Q, S]
        outs.append(_pv(p, vh[:, :, :stop]))  # [B, Hkv, G, Q, Dh]
    return jnp.concatenate(outs, axis=3)  # [B, Hkv, G, T, Dh]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked_core(qh, kh, vh, token_valid, positions, window, block):
    return _forward(qh, kh, vh, token_valid, positions, window, block).astype(qh.dtype)


def _core_fwd(qh, kh, vh, token_valid, positions, window, block):
    out = _blocked_core(qh, kh, vh, token_valid, positions, window, block)  # [B, Hkv, G, T, Dh]
    return out, (qh, kh, vh, token_valid, positions, out)


def _core_bwd(window, block, res, dout):
    """Per query block: recompute p, then dS = p * (dP - rowsum(dO * O)) (the softmax backward), dQ = dS K,
    dK += dS^T Q, dV += p^T dO; keys past the block get nothing (p is exactly 0 there, as in the square).

    dK and dV are accumulated transposed, [B, Hkv, Dh, T], as Q^T dS and dO^T p: a matmul that contracts the rows of
    both operands is one XLA:CPU's fast (YNNPACK) path does not take, and each block transposes its own (small)
    slices of Q and dO."""
    qh, kh, vh, token_valid, positions, out = res
    scale = 1.0 / math.sqrt(qh.shape[-1])
    b, hkv, g, t, dh = qh.shape
    dk_t = jnp.zeros((b, hkv, dh, t), jnp.float32)  # [B, Hkv, Dh, T]
    dv_t = jnp.zeros((b, hkv, dh, t), jnp.float32)  # [B, Hkv, Dh, T]
    dqs = []
    for start, stop in _blocks(t, block):
        qb = qh[:, :, :, start:stop]  # [B, Hkv, G, Q, Dh]
        k, v = kh[:, :, :stop], vh[:, :, :stop]  # [B, Hkv, S, Dh]
        p = _probs(qb, k, _block_mask(token_valid, positions, window, start, stop))  # [B, Hkv, G, Q, S]
        do = dout[:, :, :, start:stop]  # [B, Hkv, G, Q, Dh]
        n = g * (stop - start)
        dp = jnp.einsum("bkmd,bksd->bkms", do.reshape(b, hkv, n, dh), v,
                        preferred_element_type=jnp.float32).reshape(p.shape)  # [B, Hkv, G, Q, S]
        delta = jnp.sum(do.astype(jnp.float32) * out[:, :, :, start:stop].astype(jnp.float32), axis=-1,
                        keepdims=True)  # [B, Hkv, G, Q, 1]
        ds = (p * (dp - delta)).reshape(b, hkv, n, stop)  # [B, Hkv, G*Q, S], dS / scale
        dqs.append(jnp.einsum("bkms,bksd->bkmd", ds.astype(k.dtype), k,
                              preferred_element_type=jnp.float32).reshape(b, hkv, g, stop - start, dh) * scale)
        qb_t = qb.transpose(0, 1, 4, 2, 3).reshape(b, hkv, dh, n)  # [B, Hkv, Dh, G*Q]
        do_bt = do.transpose(0, 1, 4, 2, 3).reshape(b, hkv, dh, n)  # [B, Hkv, Dh, G*Q]
        dk_t = dk_t.at[..., :stop].add(jnp.einsum("bkdm,bkms->bkds", qb_t, ds.astype(qb.dtype),
                                                  preferred_element_type=jnp.float32))
        dv_t = dv_t.at[..., :stop].add(jnp.einsum("bkdm,bkms->bkds", do_bt, p.reshape(b, hkv, n, stop).astype(
            do.dtype), preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dqs, axis=3)  # [B, Hkv, G, T, Dh]
    dk, dv = (dk_t * scale).transpose(0, 1, 3, 2), dv_t.transpose(0, 1, 3, 2)  # [B, Hkv, T, Dh]
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_blocked_core.defvjp(_core_fwd, _core_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_valid: jax.Array, positions: jax.Array,
                      window: Optional[int] = None, block: int = 64, custom_vjp: bool = True) -> jax.Array:
    """Causal attention, equal to `segment_attention(q, [KVSegment(k, v, causal_mask(token_valid, positions,
    window))])` up to float32 rounding. q [B, T, H, Dh]; k, v [B, T, Hkv, Dh]; token_valid, positions [B, T].
    `custom_vjp=False` differentiates the loop with autodiff instead (kept for the measurement). Returns
    [B, T, H, Dh] in q's dtype."""
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qh = q.reshape(b, t, hkv, g, dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
    qh, kh = _computed_once(qh), _computed_once(kh)  # the rotary embedding of q and k, once (not per block)
    if custom_vjp:
        out = _blocked_core(qh, kh, vh, token_valid, positions, window, block)  # [B, Hkv, G, T, Dh]
    else:
        out = _forward(qh, kh, vh, token_valid, positions, window, block).astype(q.dtype)
    # A row that sees no key (a left-padding token: every earlier token is padding too) gets the square's uniform
    # softmax over all T keys, i.e. the mean of v; the blocks gave it the mean over its block's keys only.
    sees = jnp.concatenate([jnp.any(_block_mask(token_valid, positions, window, start, stop)[:, 0, 0], axis=-1)
                            for start, stop in _blocks(t, block)], axis=1)  # [B, T]
    v_mean = jnp.mean(v.astype(jnp.float32), axis=1).astype(q.dtype)  # [B, Hkv, Dh]
    out = jnp.where(sees[:, None, None, :, None], out, v_mean[:, :, None, None, :])  # [B, Hkv, G, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)  # [B, T, H, Dh]
