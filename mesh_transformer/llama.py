"""The Llama block (Llama 2/3, Qwen2, Mistral), matching HF `transformers`' LlamaForCausalLM, Qwen2ForCausalLM and
MistralForCausalLM on the same weights. GPT-J's block lives in layers.py; both share the attention core and KV cache
(`layers.attend`), the layer stack and loss (model.py), the sharding table (weights.py), the sampler and the trainer.
One family differs from another only in config keys (levanter and MaxText likewise run Llama, Qwen2 and Mistral
through one decoder with per-model options), so there is one module for the three, not three copies.

Shape glossary: B batch, T tokens, D d_model, H query heads, Hkv kv heads, Dh d_head, F d_ff, V vocabulary.

Leaf names (stacked layer leaves carry a leading [L]):
  embedding                  w [V, D]                      (no bias)
  layers/block/ln_attn       scale [D]                     RMSNorm before attention (HF input_layernorm)
  layers/block/{q,k,v}       w [D, H*Dh | Hkv*Dh], b (qkv_bias)
  layers/block/out           w [H*Dh, D]
  layers/block/ln_mlp        scale [D]                     RMSNorm before the MLP (HF post_attention_layernorm)
  layers/block/{gate,up}     w [D, F];  layers/block/down  w [F, D]
  projection/ln_f            scale [D]
  projection/lm_head         w [D, V]                      (absent with tie_word_embeddings: the embedding's transpose)
"""
from __future__ import annotations

import math
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from .dense import Dense
from .layers import LayerCache, attend


def _normal(stddev: float = 0.02) -> hk.initializers.Initializer:
    """HF's initializer_range (0.02): a fresh model here starts as a fresh HF one does."""
    return hk.initializers.TruncatedNormal(stddev=stddev)


def rms_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    """RMSNorm in float32 (HF LlamaRMSNorm), returned in x's dtype."""
    norm = hk.RMSNorm(axis=-1, eps=eps, create_scale=True, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def inv_frequencies(d_head: int, theta: float, scaling: Optional[Any]) -> np.ndarray:
    """[Dh/2] rotary frequencies; with Llama-3's rope_scaling, long wavelengths are slowed by `factor` and the band
    between low_freq_factor and high_freq_factor is interpolated (HF `_compute_llama3_parameters`)."""
    inv = 1.0 / (theta ** (np.arange(0, d_head, 2, dtype=np.float64) / d_head))
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv.astype(np.float32)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis (NeoX / Llama form; GPT-J's is rotate_every_two)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, H, Dh] by positions [B, T], in float32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    xf = x.astype(jnp.float32)
    return (xf * jnp.cos(angles) + rotate_half(xf) * jnp.sin(angles)).astype(x.dtype)


class LlamaBlock(hk.Module):
    """One pre-norm layer: h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)), grouped-query attention."""

    def __init__(self, cfg: Any, name: Optional[str] = None):
        super().__init__(name=name)
        self.cfg = cfg

    def __call__(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
                 cache: Optional[LayerCache] = None):
        """x [B, T, D]; positions [B, T]; token_valid [B, T]. Returns (x [B, T, D], the cache's k, v after this
        layer's write, or None, None)."""
        cfg = self.cfg
        b, t, d = x.shape
        h, hkv, dh = cfg.n_heads, cfg.kv_heads, cfg.d_head

        def linear(n, name, bias=False):
            return Dense(n, with_bias=bias, w_init=_normal(), name=name)

        hidden = rms_norm(x, cfg.rms_norm_eps, "ln_attn")  # [B, T, D]
        q = linear(h * dh, "q", cfg.qkv_bias)(hidden).reshape(b, t, h, dh)  # [B, T, H, Dh]
        k = linear(hkv * dh, "k", cfg.qkv_bias)(hidden).reshape(b, t, hkv, dh)  # [B, T, Hkv, Dh]
        v = linear(hkv * dh, "v", cfg.qkv_bias)(hidden).reshape(b, t, hkv, dh)  # [B, T, Hkv, Dh]
        inv_freq = inv_frequencies(dh, cfg.rope_theta, cfg.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        attn, cache_k, cache_v = attend(q, k, v, token_valid, positions, cache, cfg.attention_impl,
                                        cfg.sliding_window, cfg.attention_block_size)  # [B, T, H, Dh]
        x = x + linear(d, "out")(attn.reshape(b, t, h * dh))

        hidden = rms_norm(x, cfg.rms_norm_eps, "ln_mlp")
        ff = jax.nn.silu(linear(cfg.ffn_dim, "gate")(hidden)) * linear(cfg.ffn_dim, "up")(hidden)  # [B, T, F]
        return x + linear(d, "down")(ff), cache_k, cache_v


class LlamaEmbedding(hk.Module):
    """Token embedding without bias; `unembed` is the tied lm_head (x @ W^T)."""

    def __init__(self, n_vocab: int, d_model: int, name: Optional[str] = "embedding"):
        super().__init__(name=name)
        self.n_vocab, self.d_model = n_vocab, d_model

    def _w(self):
        return hk.get_parameter("w", [self.n_vocab, self.d_model], init=_normal())

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return jnp.take(self._w(), tokens, axis=0).astype(dtype)  # [B, T, D]

    def unembed(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("btd,vd->btv", x, self._w().astype(x.dtype), preferred_element_type=jnp.float32)


class LlamaProjection(hk.Module):
    """Final RMSNorm and lm_head (untied, no bias) or the embedding's transpose. [B, T, D] -> float32 [B, T, V]."""

    def __init__(self, cfg: Any, embedding: LlamaEmbedding, name: Optional[str] = "projection"):
        super().__init__(name=name)
        self.cfg, self.embedding = cfg, embedding

    def __call__(self, x: jax.Array) -> jax.Array:
        x = rms_norm(x, self.cfg.rms_norm_eps, "ln_f")
        if self.cfg.tie_word_embeddings:
            return self.embedding.unembed(x)
        lm_head = Dense(self.cfg.n_vocab, with_bias=False, w_init=_normal(), name="lm_head")
        return lm_head(x).astype(jnp.float32)
