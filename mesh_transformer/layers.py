"""Haiku building blocks of GPT-J, following mesh-transformer-jax (`mesh_transformer/layers.py`) and matching HF
`transformers`' `GPTJForCausalLM` on the same weights.

Shape glossary:
  B batch, T new tokens this call, S cached slots per row, P shared-prefix slots, D d_model, H heads,
  Dh d_head, F ffn dim, V vocabulary.

Attention is written over *segments* of keys so that one function serves training (the new tokens only, causal),
cached decoding (cached slots + new tokens) and the shared few-shot prefix (P slots that every row attends to, stored
once instead of B times). Keys are stored after rotary, so a cache never needs their positions again except to mask.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from .dense import Dense

NEG_INF = -1e10  # mtj's mask value: large but finite, so a fully masked (padding) row gives no NaN


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (GPT-J's interleaved form, not NeoX's rotate_half)
# ---------------------------------------------------------------------------------------------------------------
def rotary_sincos(positions: jax.Array, rotary_dims: int) -> tuple[jax.Array, jax.Array]:
    """sin, cos of shape [B, T, rotary_dims], duplicated interleaved ([s0, s0, s1, s1, ...]) as GPT-J."""
    inv_freq = 1.0 / (10000 ** (np.arange(0, rotary_dims, 2) / rotary_dims))  # [R/2]
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, R/2]
    sin = jnp.repeat(jnp.sin(angles), 2, axis=-1)  # [B, T, R]
    cos = jnp.repeat(jnp.cos(angles), 2, axis=-1)  # [B, T, R]
    return sin, cos


def rotate_every_two(x: jax.Array) -> jax.Array:
    """out[2i] = -x[2i+1], out[2i+1] = x[2i] on the last axis: each pair swapped and its first entry negated, by a
    reshape and a reverse (no strided slices: their copies and their gradients' pads cost more than the rotation)."""
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))  # [..., Dh/2, 2]
    return (pairs[..., ::-1] * jnp.asarray([-1, 1], x.dtype)).reshape(x.shape)


def apply_rotary(x: jax.Array, positions: jax.Array, rotary_dims: int) -> jax.Array:
    """Rotates the first `rotary_dims` of each head of x [B, T, H, Dh] by its token position [B, T], in float32.

    The dims past rotary_dims rotate by angle 0 (cos 1, sin 0), which leaves them exactly as they are: one
    elementwise expression over the whole head instead of a slice, a rotation and a concatenation."""
    if rotary_dims == 0:
        return x
    dh = x.shape[-1]
    sin, cos = rotary_sincos(positions, rotary_dims)  # [B, T, R]
    if rotary_dims < dh:
        pad = ((0, 0), (0, 0), (0, dh - rotary_dims))
        sin, cos = jnp.pad(sin, pad), jnp.pad(cos, pad, constant_values=1.0)  # [B, T, Dh]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]  # [B, T, 1, Dh]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_every_two(xf) * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Attention over key segments, and the KV cache it writes
# ---------------------------------------------------------------------------------------------------------------
class KVSegment(NamedTuple):
    """Keys/values one query block attends to, head-major, with a boolean mask broadcastable to [B, 1, T, S].

    k, v: [B, Hkv, S, Dh], or [Hkv, S, Dh] for a segment shared by every row (the few-shot prefix). Head-major: each
    (row, head) reads its keys contiguously, so no decode step transposes the cache (the [B, S, H, Dh] layout cost
    one transpose of the whole cache per step, ~16x slower decode attention on CPU).
    """
    k: jax.Array
    v: jax.Array
    mask: jax.Array


def segment_attention(q: jax.Array, segments: Sequence[KVSegment]) -> jax.Array:
    """softmax(q k^T / sqrt(Dh) + mask) v with one softmax, in float32, over all segments. q: [B, T, H, Dh].

    Grouped-query attention: H query heads share Hkv = k.shape[-3] key/value heads, query head h reading kv head
    h // (H / Hkv) (HF's repeat_kv); GPT-J is the case Hkv = H. The kv heads are never repeated in memory."""
    b, t, h, dh = q.shape
    hkv = segments[0].k.shape[-3]
    qg = q.reshape(b, t, hkv, h // hkv, dh)  # [B, T, Hkv, G, Dh]
    scale = 1.0 / math.sqrt(dh)
    scores = []
    for seg in segments:
        eq = "btkgd,ksd->bkgts" if seg.k.ndim == 3 else "btkgd,bksd->bkgts"
        s = jnp.einsum(eq, qg, seg.k, preferred_element_type=jnp.float32) * scale  # [B, Hkv, G, T, S]
        scores.append(jnp.where(seg.mask[:, :, None], s, NEG_INF))  # mask [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, Hkv, G, T, sum S], float32
    out = 0.0
    start = 0
    for seg in segments:
        length = seg.k.shape[-2]
        p = probs[..., start:start + length].astype(seg.v.dtype)  # [B, Hkv, G, T, S]
        if seg.v.ndim == 3:
            out = out + _shared_values(p, seg.v)
        else:
            out = out + _row_values(p, seg.v)
        start += length
    return out.reshape(b, t, h, dh).astype(q.dtype)  # [B, T, H, Dh]


def _row_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, Hkv, G, T, S] times v [B, Hkv, S, Dh] -> float32 [B, T, Hkv, G, Dh], with groups and tokens merged
    ([B, Hkv, G*T, S]): the 5-d einsum "bkgts,bksd->btkgd" is rejected by XLA's CPU runtime in bf16 (as below)."""
    b, hkv, g, t, s = p.shape
    out = jnp.einsum("bkms,bksd->bkmd", p.reshape(b, hkv, g * t, s), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hkv, g, t, -1).transpose(0, 3, 1, 2, 4)  # [B, T, Hkv, G, Dh]


def _shared_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, Hkv, G, T, S] times a shared v [Hkv, S, Dh] -> float32 [B, T, Hkv, G, Dh], one matmul batched over heads.

    The plain einsum "bkgts,ksd->btkgd" is the same product, but XLA's CPU runtime rejects it in bf16 with a float32
    result ("Unsupported element type for DotThunk: BF16 x BF16 = F32"), which broke bf16 sampling with a shared
    prefix on CPU. Heads first with rows, groups and tokens merged ([Hkv, B*G*T, S]) is a dot every backend runs.
    """
    b, hkv, g, t, s = p.shape
    rows = p.transpose(1, 0, 2, 3, 4).reshape(hkv, b * g * t, s)  # [Hkv, B*G*T, S]
    out = jnp.einsum("hms,hsd->hmd", rows, v, preferred_element_type=jnp.float32)  # [Hkv, B*G*T, Dh]
    return out.reshape(hkv, b, g, t, -1).transpose(1, 3, 0, 2, 4)  # [B, T, Hkv, G, Dh]


def causal_mask(token_valid: jax.Array, positions: Optional[jax.Array] = None,
                window: Optional[int] = None) -> jax.Array:
    """[B, 1, T, T]: token t attends to t' <= t when t' is a real (non-padding) token (and, with a sliding window,
    when it is fewer than `window` positions back, as HF's sliding_window_overlay)."""
    t = token_valid.shape[1]
    tri = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = tri[None, None] & token_valid[:, None, None, :]
    if window is not None:
        mask = mask & ((positions[:, None, :, None] - positions[:, None, None, :]) < window)
    return mask


class LayerCache(NamedTuple):
    """The decoding state as one layer sees it: the whole stacked cache (carried through the layer stack, so a write
    is in place), this layer's index in it, where the new tokens go, and what they may read.

    Attention writes the new tokens' keys/values at [layer, :, :, slot:slot+T] first and then reads the layer's
    slots (the new ones included), as gemma's `Attention` and gpt-fast's `KVCache.update` do: the write precedes the
    read in the program, so XLA never has to copy the cache to protect a read from a later in-place write.
    """
    k: jax.Array  # [L, B, Hkv, S, Dh], or this layer's own [B, Hkv, S, Dh] (layer None)
    v: jax.Array  # [L, B, Hkv, S, Dh], or [B, Hkv, S, Dh]
    layer: Optional[jax.Array]  # int32 scalar: this layer's index in the stacked cache; None: k, v are its own
    slot: Any  # int32 scalar (traced while decoding) or a Python int (a prefill at a known slot)
    mask: jax.Array  # [B, 1, T, S'] slots visible to each new token (S' = slot + T for a Python-int slot, else S)
    prefix_k: Optional[jax.Array] = None  # [Hkv, P, Dh]: this layer's shared-prefix keys
    prefix_v: Optional[jax.Array] = None  # [Hkv, P, Dh]
    prefix_mask: Optional[jax.Array] = None  # [B, 1, T, P]


def read_slots(cache: LayerCache) -> int:
    """How many slots attention reads: all of them while decoding; up to the new tokens when the slot is known at
    trace time (a prefill into an empty cache does not attend over the slots still to be generated)."""
    return cache.slot + cache.mask.shape[-2] if isinstance(cache.slot, int) else cache.k.shape[-2]


def resolve_attention_impl(attention_impl: str) -> str:
    """The config's `attention_impl` with "auto" resolved for the backend tracing the model: "blocked" on CPU (where
    it measured faster, BENCHMARKS.md "Training"), "xla" elsewhere."""
    if attention_impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "xla"
    return attention_impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, token_valid: jax.Array, positions: jax.Array,
           cache: Optional[LayerCache], attention_impl: str = "xla", window: Optional[int] = None,
           block_size: int = 64):
    """The attention core every family shares. q [B, T, H, Dh]; the new tokens' k, v [B, T, Hkv, Dh] (after rotary).

    Without a cache: causal attention over the new tokens (`attention_impl` "xla": the whole [T, T] square;
    "blocked": query blocks of `block_size` rows over the keys on and below the diagonal, attention.py; "cudnn":
    jax.nn.dot_product_attention's cuDNN kernel, without a sliding window; "auto": blocked on CPU, xla elsewhere).
    With a cache (every implementation): their keys/values are written into it, then the new tokens attend to the
    shared prefix (if any) and the cache's visible slots.
    Returns (attention output [B, T, H, Dh], the cache's updated k, v ([L, B, Hkv, S, Dh], or this layer's own
    [B, Hkv, S, Dh]) or None, None)."""
    if cache is None:
        attention_impl = resolve_attention_impl(attention_impl)
        if attention_impl == "blocked":
            from .attention import blocked_attention  # attention.py imports NEG_INF from here

            return blocked_attention(q, k, v, token_valid, positions, window, block_size), None, None
        if attention_impl == "cudnn" and window is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # [B, T, H, Dh]
            return out, None, None
        seg = KVSegment(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),  # [B, Hkv, T, Dh]
                        causal_mask(token_valid, positions, window))
        return segment_attention(q, [seg]), None, None
    z = jnp.zeros((), jnp.int32)
    n = read_slots(cache)
    k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
    if cache.layer is None:  # this layer's own cache arrays [B, Hkv, S, Dh] (per-layer params)
        at = (z, z, jnp.asarray(cache.slot, jnp.int32), z)
        new_k = jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), at)
        new_v = jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), at)
        layer_k, layer_v = new_k[:, :, :n], new_v[:, :, :n]  # [B, Hkv, S', Dh]
    else:  # the stacked cache [L, B, Hkv, S, Dh]
        at = (cache.layer, z, z, jnp.asarray(cache.slot, jnp.int32), z)
        new_k = jax.lax.dynamic_update_slice(cache.k, k_new[None].astype(cache.k.dtype), at)
        new_v = jax.lax.dynamic_update_slice(cache.v, v_new[None].astype(cache.v.dtype), at)
        layer_k = jax.lax.dynamic_index_in_dim(new_k, cache.layer, 0, keepdims=False)[:, :, :n]  # [B, Hkv, S', Dh]
        layer_v = jax.lax.dynamic_index_in_dim(new_v, cache.layer, 0, keepdims=False)[:, :, :n]
    segments = []
    if cache.prefix_k is not None:
        segments.append(KVSegment(cache.prefix_k, cache.prefix_v, cache.prefix_mask))
    segments.append(KVSegment(layer_k.astype(q.dtype), layer_v.astype(q.dtype), cache.mask))
    return segment_attention(q, segments), new_k, new_v


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------
def layer_norm(x: jax.Array, name: str) -> jax.Array:
    """LayerNorm (eps 1e-5, biased variance), computed in float32 and returned in x's dtype."""
    ln = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name=name,
                      param_axis=-1)
    return ln(x.astype(jnp.float32)).astype(x.dtype)


def _trunc(stddev: float) -> hk.initializers.Initializer:
    return hk.initializers.TruncatedNormal(stddev=stddev)


class GPTJBlock(hk.Module):
    """One GPT-J layer: h = LN(x); x + Attn(h) + MLP(h) (parallel residual, one LayerNorm)."""

    def __init__(self, n_heads: int, d_head: int, d_ff: int, rotary_dims: int, n_layers: int,
                 attention_impl: str = "xla", attention_block_size: int = 64, name: Optional[str] = None):
        super().__init__(name=name)
        self.n_heads, self.d_head, self.d_ff = n_heads, d_head, d_ff
        self.rotary_dims, self.n_layers = rotary_dims, n_layers
        self.attention_impl, self.attention_block_size = attention_impl, attention_block_size

    def __call__(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
                 cache: Optional[LayerCache] = None):
        """x [B, T, D]; positions [B, T]; token_valid [B, T]. Returns (x [B, T, D], the cache's k, v after this
        layer's write, or None, None without a cache)."""
        b, t, d = x.shape
        h, dh = self.n_heads, self.d_head
        out_init = _trunc((2.0 / self.n_layers) / math.sqrt(d))
        inner = h * dh

        hidden = layer_norm(x, "ln")  # [B, T, D]
        q = Dense(inner, with_bias=False, name="q")(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        k = Dense(inner, with_bias=False, name="k")(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        v = Dense(inner, with_bias=False, name="v")(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        q = apply_rotary(q, positions, self.rotary_dims)
        k = apply_rotary(k, positions, self.rotary_dims)

        attn, cache_k, cache_v = attend(q, k, v, token_valid, positions, cache, self.attention_impl,
                                        block_size=self.attention_block_size)
        attn_out = Dense(d, with_bias=False, w_init=out_init, name="out")(attn.reshape(b, t, inner))

        ff = Dense(self.d_ff, name="fc_in")(hidden)  # [B, T, F]
        ff = jax.nn.gelu(ff, approximate=True)
        ff_out = Dense(d, w_init=out_init, name="fc_out")(ff)  # [B, T, D]
        return x + attn_out + ff_out, cache_k, cache_v


class Embedding(hk.Module):
    """Token embedding with mtj's bias (HF folds it into wte). tokens [B, T] -> [B, T, D]."""

    def __init__(self, n_vocab: int, d_model: int, name: Optional[str] = "embedding"):
        super().__init__(name=name)
        self.n_vocab, self.d_model = n_vocab, d_model

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        w = hk.get_parameter("w", [self.n_vocab, self.d_model], init=_trunc(1.0 / math.sqrt(self.n_vocab)))
        b = hk.get_parameter("b", [self.d_model], init=jnp.zeros)
        return (jnp.take(w, tokens, axis=0) + b).astype(dtype)


class Projection(hk.Module):
    """Final LayerNorm and untied lm_head with bias. [B, T, D] -> float32 logits [B, T, V]."""

    def __init__(self, n_vocab: int, name: Optional[str] = "projection"):
        super().__init__(name=name)
        self.n_vocab = n_vocab

    def __call__(self, x: jax.Array) -> jax.Array:
        x = layer_norm(x, "ln_f")
        d = x.shape[-1]
        logits = Dense(self.n_vocab, w_init=_trunc(1.0 / math.sqrt(d)), name="lm_head")(x)
        return logits.astype(jnp.float32)
