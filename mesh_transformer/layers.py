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
from typing import NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

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
    """out[2i] = -x[2i+1], out[2i+1] = x[2i] on the last axis."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return jnp.stack((-x2, x1), axis=-1).reshape(x.shape)


def apply_rotary(x: jax.Array, positions: jax.Array, rotary_dims: int) -> jax.Array:
    """Rotates the first `rotary_dims` of each head of x [B, T, H, Dh] by its token position [B, T]."""
    if rotary_dims == 0:
        return x
    sin, cos = rotary_sincos(positions, rotary_dims)  # [B, T, R]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]  # [B, T, 1, R]
    x_rot, x_pass = x[..., :rotary_dims], x[..., rotary_dims:]
    x_rot = (x_rot.astype(jnp.float32) * cos + rotate_every_two(x_rot.astype(jnp.float32)) * sin).astype(x.dtype)
    return jnp.concatenate([x_rot, x_pass], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Attention over key segments
# ---------------------------------------------------------------------------------------------------------------
class KVSegment(NamedTuple):
    """Keys/values one query block attends to, with a boolean mask broadcastable to [B, 1, T, S].

    k, v: [B, S, H, Dh], or [S, H, Dh] for a segment shared by every row (the few-shot prefix); with heads_first,
    [B, H, S, Dh] or [H, S, Dh] (a decode cache laid out so that no step transposes it).
    """
    k: jax.Array
    v: jax.Array
    mask: jax.Array
    heads_first: bool = False


# (shared by all rows, heads_first) -> einsum of the scores q.k and of the output p.v
_SCORE_EQ = {(False, False): "bthd,bshd->bhts", (True, False): "bthd,shd->bhts",
             (False, True): "bthd,bhsd->bhts", (True, True): "bthd,hsd->bhts"}
_VALUE_EQ = {(False, False): "bhts,bshd->bthd", (True, False): "bhts,shd->bthd",
             (False, True): "bhts,bhsd->bthd"}  # (True, True): _shared_heads_first_values


def segment_attention(q: jax.Array, segments: Sequence[KVSegment]) -> jax.Array:
    """softmax(q k^T / sqrt(Dh) + mask) v with one softmax, in float32, over all segments. q: [B, T, H, Dh]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = []
    for seg in segments:
        eq = _SCORE_EQ[(seg.k.ndim == 3, seg.heads_first)]
        s = jnp.einsum(eq, q, seg.k, preferred_element_type=jnp.float32) * scale  # [B, H, T, S]
        scores.append(jnp.where(seg.mask, s, NEG_INF))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, H, T, sum S], float32
    out = 0.0
    start = 0
    for seg in segments:
        length = seg.k.shape[-2] if seg.heads_first else seg.k.shape[-3]
        p = probs[..., start:start + length].astype(seg.v.dtype)  # [B, H, T, S]
        if seg.v.ndim == 3 and seg.heads_first:
            out = out + _shared_heads_first_values(p, seg.v)
        else:
            eq = _VALUE_EQ[(seg.v.ndim == 3, seg.heads_first)]
            out = out + jnp.einsum(eq, p, seg.v, preferred_element_type=jnp.float32)
        start += length
    return out.astype(q.dtype)  # [B, T, H, Dh]


def _shared_heads_first_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, H, T, S] times a shared v [H, S, Dh] -> float32 [B, T, H, Dh], as one matmul batched over heads.

    The plain einsum "bhts,hsd->bthd" is the same product, but XLA's CPU runtime rejects it in bf16 with a float32
    result ("Unsupported element type for DotThunk: BF16 x BF16 = F32"), which broke bf16 sampling with a shared
    prefix on CPU. Heads first with rows and tokens merged ([H, B*T, S]) is a dot every backend runs.
    """
    b, h, t, s = p.shape
    rows = p.transpose(1, 0, 2, 3).reshape(h, b * t, s)  # [H, B*T, S]
    out = jnp.einsum("hms,hsd->hmd", rows, v, preferred_element_type=jnp.float32)  # [H, B*T, Dh]
    return out.reshape(h, b, t, -1).transpose(1, 2, 0, 3)  # [B, T, H, Dh]


def causal_mask(token_valid: jax.Array) -> jax.Array:
    """[B, 1, T, T]: token t attends to t' <= t when t' is a real (non-padding) token."""
    t = token_valid.shape[1]
    tri = jnp.tril(jnp.ones((t, t), dtype=bool))
    return tri[None, None] & token_valid[:, None, None, :]


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


class LayerCache(NamedTuple):
    """What one layer reads of the decoding state (read only: new keys are returned, not written in place)."""
    k: jax.Array  # [B, S, H, Dh] ([B, H, S, Dh] with heads_first)
    v: jax.Array  # [B, S, H, Dh] ([B, H, S, Dh] with heads_first)
    mask: jax.Array  # [B, 1, T, S]
    prefix_k: Optional[jax.Array] = None  # [P, H, Dh] ([H, P, Dh] with prefix_heads_first)
    prefix_v: Optional[jax.Array] = None  # [P, H, Dh] ([H, P, Dh] with prefix_heads_first)
    heads_first: bool = False
    prefix_heads_first: bool = False


class GPTJBlock(hk.Module):
    """One GPT-J layer: h = LN(x); x + Attn(h) + MLP(h) (parallel residual, one LayerNorm)."""

    def __init__(self, n_heads: int, d_head: int, d_ff: int, rotary_dims: int, n_layers: int,
                 attention_impl: str = "xla", name: Optional[str] = None):
        super().__init__(name=name)
        self.n_heads, self.d_head, self.d_ff = n_heads, d_head, d_ff
        self.rotary_dims, self.n_layers = rotary_dims, n_layers
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
                 cache: Optional[LayerCache] = None):
        """x [B, T, D]; positions [B, T]; token_valid [B, T]. Returns (x [B, T, D], new k, new v [B, T, H, Dh])."""
        b, t, d = x.shape
        h, dh = self.n_heads, self.d_head
        out_init = _trunc((2.0 / self.n_layers) / math.sqrt(d))
        inner = h * dh

        hidden = layer_norm(x, "ln")  # [B, T, D]
        q = hk.Linear(inner, with_bias=False, name="q")(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        k = hk.Linear(inner, with_bias=False, name="k")(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        v = hk.Linear(inner, with_bias=False, name="v")(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        q = apply_rotary(q, positions, self.rotary_dims)
        k = apply_rotary(k, positions, self.rotary_dims)

        if cache is None and self.attention_impl == "cudnn":
            attn = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # [B, T, H, Dh]
        else:
            segments = []
            if cache is not None and cache.prefix_k is not None:
                segments.append(KVSegment(cache.prefix_k, cache.prefix_v, jnp.ones((1, 1, 1, 1), bool),
                                          cache.prefix_heads_first))
            if cache is not None:
                segments.append(KVSegment(cache.k, cache.v, cache.mask, cache.heads_first))
            segments.append(KVSegment(k, v, causal_mask(token_valid)))
            attn = segment_attention(q, segments)  # [B, T, H, Dh]
        attn_out = hk.Linear(d, with_bias=False, w_init=out_init, name="out")(attn.reshape(b, t, inner))

        ff = hk.Linear(self.d_ff, name="fc_in")(hidden)  # [B, T, F]
        ff = jax.nn.gelu(ff, approximate=True)
        ff_out = hk.Linear(d, w_init=out_init, name="fc_out")(ff)  # [B, T, D]
        return x + attn_out + ff_out, k, v


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
        logits = hk.Linear(self.n_vocab, w_init=_trunc(1.0 / math.sqrt(d)), name="lm_head")(x)
        return logits.astype(jnp.float32)
