"""CausalTransformer: GPT-J as in mesh-transformer-jax (`CausalTransformerShard`), with a batch dimension, written
for one `jax.jit` over a ('dp','mp') mesh instead of xmap.

Shape glossary: B batch, T tokens, L layers, S cache slots, P shared-prefix slots, H heads, Dh d_head, V vocab.

Parameters are one Haiku dict. The layers are stacked (`hk.layer_stack`), so every per-layer leaf has a leading
[L] axis; `scan_layers` only decides whether that stack is run as a loop or unrolled. Leaf names:
  embedding                  w [V, D], b [D]
  layers/block/ln            scale [L, D], offset [L, D]
  layers/block/{q,k,v}       w [L, D, H*Dh]
  layers/block/out           w [L, H*Dh, D]
  layers/block/fc_in         w [L, D, F], b [L, F]
  layers/block/fc_out        w [L, F, D], b [L, D]
  projection/ln_f            scale [D], offset [D]
  projection/lm_head         w [D, V], b [V]
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from .config import Config, load_config
from .layers import Embedding, GPTJBlock, LayerCache, Projection

Params = Any  # a Haiku params dict

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class KVCache(NamedTuple):
    """Decoding state of a batch: keys/values (after rotary) of every slot written so far, and which slots hold a
    real token. The sampler owns it; the model only reads it and returns the new tokens' keys/values."""
    k: jax.Array  # [L, B, S, H, Dh]
    v: jax.Array  # [L, B, S, H, Dh]
    pos: jax.Array  # [B, S] int32: position of the token in each slot
    valid: jax.Array  # [B, S] bool: slot holds a real token


class PrefixKV(NamedTuple):
    """Keys/values of a prompt shared by every row (positions 0..P-1), stored once, not per row."""
    k: jax.Array  # [L, P, H, Dh]
    v: jax.Array  # [L, P, H, Dh]


class HeadMajorKVCache(NamedTuple):
    """A KVCache laid out [L, B, H, S, Dh] for decoding: each (row, head) reads its keys contiguously, so attention
    needs no transpose of the whole cache per step (the [L, B, S, H, Dh] layout costs one, ~16x slower attention
    on CPU). `forward` still returns new keys/values [L, B, T, H, Dh]; the writer transposes those few."""
    k: jax.Array  # [L, B, H, S, Dh]
    v: jax.Array  # [L, B, H, S, Dh]
    pos: jax.Array  # [B, S] int32
    valid: jax.Array  # [B, S] bool


class HeadMajorPrefixKV(NamedTuple):
    """A PrefixKV laid out [L, H, P, Dh] (see HeadMajorKVCache)."""
    k: jax.Array  # [L, H, P, Dh]
    v: jax.Array  # [L, H, P, Dh]


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


class CausalTransformer:
    """GPT-J. `init(rng) -> params`; `logits(params, tokens) -> float32 [B, T, V]`; `loss(...)`; `forward(...)` for
    cached decoding. Every method is a pure function of its arguments, so callers jit and shard them."""

    def __init__(self, config: Any):
        self.config: Config = load_config(config)
        self._net = hk.without_apply_rng(hk.transform(self._forward_fn))

    # ----------------------------------------------------------------- Haiku function
    def _forward_fn(self, tokens, positions, token_valid, cache: Optional[KVCache], prefix: Optional[PrefixKV],
                    last_only: bool = False):
        cfg = self.config
        dtype = _DTYPES[cfg.compute_dtype]

        def in_compute_dtype(next_getter, value, context):
            return next_getter(value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value)

        # Params are cast to the compute dtype where they are read: a layer's inside the layer loop, so only one
        # layer's compute copy exists at a time (mtj cast the whole tree up front: at 6B a 12 GB bf16 copy).
        with hk.custom_getter(in_compute_dtype):
            x = Embedding(cfg.n_vocab, cfg.d_model)(tokens, dtype)  # [B, T, D]

        def layer(x, *per_layer):
            layer_cache = None
            if cache is not None:
                ck, cv = per_layer[0], per_layer[1]
                pk, pv = (per_layer[2], per_layer[3]) if prefix is not None else (None, None)
                # slot s is visible to new token t when it holds a real token at an earlier or equal position
                mask = cache.valid[:, None, None, :] & (cache.pos[:, None, None, :] <= positions[:, None, :, None])
                layer_cache = LayerCache(ck, cv, mask, pk, pv,  # mask [B, 1, T, S]
                                         heads_first=isinstance(cache, HeadMajorKVCache),
                                         prefix_heads_first=isinstance(prefix, HeadMajorPrefixKV))
            block = GPTJBlock(cfg.n_heads, cfg.d_head, cfg.ffn_dim, cfg.rotary_dims, cfg.layers,
                              attention_impl=cfg.attention_impl, name="block")
            with hk.custom_getter(in_compute_dtype):  # this layer's slice of the stacked params
                x, k, v = block(x, positions, token_valid, layer_cache)
            return x, (k, v)

        if cfg.remat != "none":
            layer = hk.remat(layer, policy=_remat_policy(cfg.remat))
        per_layer_inputs = ()
        if cache is not None:
            per_layer_inputs = (cache.k, cache.v) + ((prefix.k, prefix.v) if prefix is not None else ())
        elif prefix is not None:
            raise ValueError("a shared prefix needs a KVCache for the rows (it may have zero slots)")
        stack = hk.layer_stack(cfg.layers, with_per_layer_inputs=True,
                               unroll=1 if cfg.scan_layers else cfg.layers, name="layers")
        if per_layer_inputs:
            x, (new_k, new_v) = stack(layer)(x, *per_layer_inputs)
        else:
            x, (new_k, new_v) = stack(lambda x, _: layer(x))(x, jnp.zeros((cfg.layers,), jnp.int32))
        if last_only:  # prefill needs the next-token logits only: skip a [B, T, V] float32 tensor
            x = x[:, -1:]
        with hk.custom_getter(in_compute_dtype):
            logits = Projection(cfg.n_vocab)(x)  # [B, T, V] float32 ([B, 1, V] with last_only)
        return logits, new_k, new_v  # new_k, new_v: [L, B, T, H, Dh]

    # ----------------------------------------------------------------- public API
    def init(self, rng: jax.Array) -> Params:
        """fp32 params with mtj's init (bf16 when the config sets early_cast)."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        params = self._net.init(rng, tokens, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool), None, None)
        if self.config.early_cast:
            params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        return params

    @property
    def compute_dtype(self):
        return _DTYPES[self.config.compute_dtype]

    def cast_for_compute(self, params: Params) -> Params:
        """Params in the compute dtype (mtj casts the whole tree to bf16 before the forward pass)."""
        dtype = _DTYPES[self.config.compute_dtype]
        return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    def forward(self, params: Params, tokens: jax.Array, positions: Optional[jax.Array] = None,
                token_valid: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                prefix: Optional[PrefixKV] = None, *, last_only: bool = False):
        """Runs the model on tokens [B, T] at `positions` [B, T] (default 0..T-1).

        With `cache` (a KVCache, or a HeadMajorKVCache for decoding), the new tokens also attend to the cache's valid
        slots (and to `prefix`, a PrefixKV or HeadMajorPrefixKV, when given). last_only: logits of the last token
        only ([B, 1, V]), as a prefill needs.
        Returns (logits float32 [B, T, V], new keys, new values [L, B, T, H, Dh]); the caller writes the new
        keys/values into its cache (in place, under jit with donation).
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        return self._net.apply(params, tokens, positions, token_valid, cache, prefix, last_only)

    def logits(self, params: Params, tokens: jax.Array) -> jax.Array:
        """float32 logits [B, T, V] of tokens [B, T]."""
        return self.forward(params, tokens)[0]

    def loss(self, params: Params, tokens: jax.Array, targets: jax.Array, loss_mask: Optional[jax.Array] = None,
             z_loss: bool = False):
        """Mean cross entropy of `targets` [B, T] over the positions where loss_mask [B, T] is 1.

        With z_loss (training), adds mtj's `coef * mean((logsumexp(l) - max(l))**2)` over the same positions.
        Returns (loss, metrics dict with the plain cross entropy and the number of tokens counted).
        """
        logits = self.logits(params, tokens)  # [B, T, V]
        return masked_lm_loss(logits, targets, loss_mask, self.config.z_loss if z_loss else 0.0)

    def init_cache(self, batch: int, slots: int, dtype=None, heads_first: bool = False) -> KVCache:
        """An empty KVCache [L, B, S, H, Dh] (a HeadMajorKVCache [L, B, H, S, Dh] with heads_first)."""
        cfg = self.config
        dtype = dtype or _DTYPES[cfg.compute_dtype]
        if heads_first:
            shape = (cfg.layers, batch, cfg.n_heads, slots, cfg.d_head)
            return HeadMajorKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                    jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), bool))
        shape = (cfg.layers, batch, slots, cfg.n_heads, cfg.d_head)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                       jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), bool))


def masked_lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: Optional[jax.Array], z_coef: float):
    """Cross entropy (+ optional z-loss) averaged over masked positions. logits [B, T, V], targets [B, T]."""
    if loss_mask is None:
        loss_mask = jnp.ones(targets.shape, jnp.float32)
    mask = loss_mask.astype(jnp.float32)  # [B, T]
    count = jnp.maximum(mask.sum(), 1.0)
    max_logit = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))  # [B, T, 1]
    shifted = logits - max_logit
    log_z = jnp.log(jnp.exp(shifted).sum(axis=-1))  # [B, T]: logsumexp(l) - max(l)
    target_logit = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, T]
    ce = ((log_z - target_logit) * mask).sum() / count
    loss = ce
    if z_coef:
        loss = loss + z_coef * (jnp.square(log_z) * mask).sum() / count
    return loss, {"ce": ce, "tokens": mask.sum()}
