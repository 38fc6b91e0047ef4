"""CausalTransformer: GPT-J as in mesh-transformer-jax (`CausalTransformerShard`), with a batch dimension, written
for one `jax.jit` over a ('dp','mp') mesh instead of xmap.

Shape glossary: B batch, T tokens, L layers, S cache slots, P shared-prefix slots, H heads, Dh d_head, V vocab.

Parameters are one Haiku dict. The layers are stacked (`hk.layer_stack`), so every per-layer leaf has a leading
[L] axis; `scan_layers` only decides whether that stack is run as a loop or unrolled.

A second, per-layer form (`split_layers`: leaf `layers/block/q` [L, ...] becomes `layers_0/block/q` ...
`layers_{L-1}/block/q`, each one layer's array) is what the sampler runs, with a per-layer KV cache (tuples of L
arrays): XLA's CPU backend copies every slice it takes of a stacked array before a matmul reads it, so a decode step
over stacked params and a stacked cache spent more time copying each layer's weights and cache out of the stacks
than multiplying (BENCHMARKS.md). `forward` takes either form; training keeps the stacked one. Leaf names:
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
from .sharding import is_stacked
from .llama import LlamaBlock, LlamaEmbedding, LlamaProjection

Params = Any  # a Haiku params dict

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class KVCache(NamedTuple):
    """Decoding state of a batch, head-major: keys (after rotary) and values of every slot written so far, and which
    slots hold a real token. `forward` writes the new tokens into it inside attention (in place under jit) and
    returns it. Each (row, kv head) reads its keys contiguously, so no decode step transposes the cache.
    With per-layer params (split_layers), k and v are tuples of L arrays [B, Hkv, S, Dh] instead."""
    k: Any  # [L, B, Hkv, S, Dh], or a tuple of L [B, Hkv, S, Dh]
    v: Any  # [L, B, Hkv, S, Dh], or a tuple of L [B, Hkv, S, Dh]
    pos: jax.Array  # [B, S] int32: position of the token in each slot
    valid: jax.Array  # [B, S] bool: slot holds a real token


class PrefixKV(NamedTuple):
    """Keys/values of a prompt shared by every row (positions 0..P-1), stored once, not per row."""
    k: Any  # [L, Hkv, P, Dh], or (per-layer params) a tuple of L [Hkv, P, Dh]
    v: Any  # [L, Hkv, P, Dh], or a tuple of L [Hkv, P, Dh]

    @property
    def length(self) -> int:
        """P, the prefix's token count."""
        return self.k[0].shape[1] if isinstance(self.k, tuple) else self.k.shape[2]


def layer_module(i: int, stacked_path: str) -> str:
    """The per-layer module path of layer i: layers/block/q -> layers_{i}/block/q."""
    return f"layers_{i}/{stacked_path.split('/', 1)[1]}"


def is_per_layer(params: Params) -> bool:
    """Whether params are in split_layers' form."""
    return any(k.startswith("layers_0/") for k in params)


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


class CausalTransformer:
    """GPT-J, or the Llama block (config model_type llama / qwen2 / mistral; llama.py). `init(rng) -> params`; `logits(params, tokens) -> float32 [B, T, V]`; `loss(...)`; `forward(...)` for
    cached decoding. Every method is a pure function of its arguments, so callers jit and shard them."""

    def __init__(self, config: Any):
        self.config: Config = load_config(config)
        self._net = hk.without_apply_rng(hk.transform(self._forward_fn))

    # ----------------------------------------------------------------- Haiku function
    def _forward_fn(self, tokens, positions, token_valid, cache: Optional[KVCache], prefix: Optional[PrefixKV],
                    slot=0, last_only: bool = False, per_layer: bool = False):
        cfg = self.config
        dtype = _DTYPES[cfg.compute_dtype]
        window = getattr(cfg, "sliding_window", None)

        def in_compute_dtype(next_getter, value, context):
            return next_getter(value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value)

        # Params are cast to the compute dtype where they are read: a layer's inside the layer loop, so only one
        # layer's compute copy exists at a time (mtj cast the whole tree up front: at 6B a 12 GB bf16 copy).
        embedding = (LlamaEmbedding if cfg.is_llama else Embedding)(cfg.n_vocab, cfg.d_model)
        with hk.custom_getter(in_compute_dtype):
            x = embedding(tokens, dtype)  # [B, T, D]

        if prefix is not None and cache is None:
            raise ValueError("a shared prefix needs a KVCache for the rows")
        mask = prefix_mask = None
        if cache is not None:
            # the new tokens' slots first, so that they see themselves and the earlier ones
            z = jnp.zeros((), jnp.int32)
            at = (z, jnp.asarray(slot, jnp.int32))
            cache = cache._replace(pos=jax.lax.dynamic_update_slice(cache.pos, positions.astype(jnp.int32), at),
                                   valid=jax.lax.dynamic_update_slice(cache.valid, token_valid, at))
            n = slot + tokens.shape[1] if isinstance(slot, int) else cache.pos.shape[1]  # slots read (read_slots)
            pos, valid = cache.pos[:, :n], cache.valid[:, :n]
            # slot s is visible to new token t when it holds a real token at an earlier or equal position
            mask = valid[:, None, None, :] & (pos[:, None, None, :] <= positions[:, None, :, None])  # [B, 1, T, S']
            if window is not None:
                mask = mask & ((positions[:, None, :, None] - pos[:, None, None, :]) < window)
            if prefix is not None:
                p_pos = jnp.arange(prefix.length, dtype=jnp.int32)
                prefix_mask = jnp.ones((1, 1, 1, 1), bool)
                if window is not None:
                    prefix_mask = (positions[:, None, :, None] - p_pos[None, None, None, :]) < window  # [B,1,T,P]

        def layer(carry, index, *prefix_kv):
            x, ck, cv = carry
            layer_cache = None
            if cache is not None:
                pk, pv = prefix_kv if prefix is not None else (None, None)
                layer_cache = LayerCache(ck, cv, index, slot, mask, pk, pv, prefix_mask)
            block = self._block(cfg)
            with hk.custom_getter(in_compute_dtype):  # this layer's slice of the stacked params
                x, ck, cv = block(x, positions, token_valid, layer_cache)
            return (x, ck, cv), None

        if per_layer:  # split_layers' params: layer i's own arrays and its own cache arrays, nothing sliced
            ck, cv = [], []
            for i in range(cfg.layers):
                layer_cache = None
                if cache is not None:
                    pk, pv = (prefix.k[i], prefix.v[i]) if prefix is not None else (None, None)
                    layer_cache = LayerCache(cache.k[i], cache.v[i], None, slot, mask, pk, pv, prefix_mask)
                with hk.name_scope(f"layers_{i}"), hk.custom_getter(in_compute_dtype):
                    x, k_i, v_i = self._block(cfg)(x, positions, token_valid, layer_cache)
                ck.append(k_i)
                cv.append(v_i)
            ck, cv = tuple(ck), tuple(cv)
        else:
            if cfg.remat != "none":
                layer = hk.remat(layer, policy=_remat_policy(cfg.remat))
            stack = hk.layer_stack(cfg.layers, with_per_layer_inputs=True,
                                   unroll=1 if cfg.scan_layers else cfg.layers, name="layers")
            inputs = (jnp.arange(cfg.layers, dtype=jnp.int32),) + ((prefix.k, prefix.v) if prefix is not None else ())
            # the whole cache rides in the carry: each layer writes its slice in place and reads it back
            carry = (x, cache.k, cache.v) if cache is not None else (x, None, None)
            (x, ck, cv), _ = stack(layer)(carry, *inputs)
        if last_only:  # prefill needs the next-token logits only: skip a [B, T, V] float32 tensor
            x = x[:, -1:]
        with hk.custom_getter(in_compute_dtype):
            project = LlamaProjection(cfg, embedding) if cfg.is_llama else Projection(cfg.n_vocab)
            logits = project(x)  # [B, T, V] float32 ([B, 1, V] with last_only)
        return logits, (cache._replace(k=ck, v=cv) if cache is not None else None)

    @staticmethod
    def _block(cfg: Config):
        """The layer of the config's family: GPT-J's (layers.py) or the Llama block (llama.py)."""
        if cfg.is_llama:
            return LlamaBlock(cfg, name="block")
        return GPTJBlock(cfg.n_heads, cfg.d_head, cfg.ffn_dim, cfg.rotary_dims, cfg.layers,
                         attention_impl=cfg.attention_impl, attention_block_size=cfg.attention_block_size,
                         name="block")

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
                prefix: Optional[PrefixKV] = None, slot=0, *, last_only: bool = False):
        """Runs the model on tokens [B, T] at `positions` [B, T] (default 0..T-1).

        With `cache`, the new tokens' keys/values (and positions, validity) are written at slots [slot, slot + T),
        in place under jit, and the new tokens attend to the cache's valid slots at positions <= theirs (and to
        `prefix`, when given). `slot` may be traced (decoding) or a Python int (a prefill: then only slots
        [0, slot + T) are read). last_only: logits of the last token only ([B, 1, V]), as a prefill needs.
        Returns (logits float32 [B, T, V], the updated KVCache, or None without a cache).
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        return self._net.apply(params, tokens, positions, token_valid, cache, prefix, slot, last_only,
                               is_per_layer(params))

    def split_layers(self, params: Params) -> Params:
        """The per-layer form of stacked params (see the module docstring); other leaves are kept as they are."""
        out = {}
        for module, leaves in params.items():
            if is_stacked(module):
                for i in range(self.config.layers):
                    out[layer_module(i, module)] = {name: leaf[i] for name, leaf in leaves.items()}
            else:
                out[module] = leaves
        return out

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

    def init_cache(self, batch: int, slots: int, dtype=None, per_layer: bool = False) -> KVCache:
        """An empty KVCache [L, B, Hkv, S, Dh] (per_layer: tuples of L [B, Hkv, S, Dh], for split_layers' params).
        v starts at -0.0 (equal to 0 in every use): two identical zero buffers are merged by XLA into one, which it
        then copies once per cache before the first in-place write."""
        cfg = self.config
        dtype = dtype or _DTYPES[cfg.compute_dtype]
        shape = (batch, cfg.kv_heads, slots, cfg.d_head)
        if per_layer:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.layers))
            v = tuple(jnp.full(shape, -0.0, dtype) for _ in range(cfg.layers))
        else:
            k, v = jnp.zeros((cfg.layers,) + shape, dtype), jnp.full((cfg.layers,) + shape, -0.0, dtype)
        return KVCache(k, v, jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), bool))

    def prefix_kv(self, params: Params, tokens: jax.Array) -> tuple[PrefixKV, jax.Array]:
        """(PrefixKV [L, Hkv, P, Dh] of one shared prompt tokens [1, P] (per-layer params: per-layer tuples),
        float32 logits after it [V])."""
        per_layer = is_per_layer(params)
        cache = self.init_cache(1, tokens.shape[1], per_layer=per_layer)
        logits, cache = self.forward(params, tokens, cache=cache, slot=0, last_only=True)  # [1, 1, V]
        if per_layer:
            return PrefixKV(tuple(k[0] for k in cache.k), tuple(v[0] for v in cache.v)), logits[0, -1]
        return PrefixKV(cache.k[:, 0], cache.v[:, 0]), logits[0, -1]


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
