"""Sampling from a CausalTransformer: one prefill, then a decode loop inside `lax.while_loop`, jitted once per shape.

Follows the gemma sampler (one jitted function around `lax.while_loop`) and gpt-fast (separate `prefill` and
`decode_step` over a static, preallocated KV cache), replacing mesh-transformer-jax's `generate` (left-pad to seq,
fixed-length `lax.scan`, nucleus sampling only).

Shape glossary: B rows, Tp padded prompt length (a bucket), N max new tokens, S = Tp + N - 1 cache slots,
P shared-prefix tokens, V vocabulary, L layers, H heads, Dh d_head.

Design
  * The KV cache is allocated inside the jitted function and carried by the while loop, so every
    `lax.dynamic_update_slice` into it is in place; nothing crosses the jit boundary but tokens and params.
    It is head-major (`model.KVCache` [L, B, Hkv, S, Dh]; the prefix [L, Hkv, P, Dh]; with the layers unrolled,
    the sampler's params, cache and prefix are per layer, tuples of L arrays, see `model.split_layers`): attention
    reads each (row, head)'s keys contiguously ([L, B, S, H, Dh] made XLA transpose the cache every step: 16x slower
    decode attention on CPU). The model writes each layer's new keys inside attention, before reading them, so the
    write is in place and needs no ordering trick.
  * Prompts are LEFT-padded to a bucket length (`bucket_length`: powers of 2 to 32, multiples of 16 to 256, then
    of 64), so the last prompt token of every row sits at index Tp-1 and compiles stay few. A row's positions
    count from 0 (from P with a shared prefix) after its padding; pads have token_valid False and are never
    attended to.
  * Shared prefix (few-shot exemplars): its keys/values are computed once (batch 1) and stored as one
    `PrefixKV` [L, H, P, Dh] that every row attends to, cached by its token ids across calls and
    batches, so neither memory nor prefill time scales with batch x prefix length.
  * Stops, per row, checked on device each step: EOS; any token in `stop_tokens` (for a stop string: every vocabulary
    token whose decoded text CONTAINS it, so GPT-2's "\\n\\n" token stops on "\\n"; exact whenever the stop string
    falls inside one token); any `stop_sequences` (token-id lists matched against the row's last generated tokens,
    e.g. the 2-token tokenization of a stop string); max_new_tokens. The loop ends when every row is done.
    `generate` then cuts each decoded completion at the first stop string on the host, so the text is exact even
    when a stop string spans tokens in a way the device did not see (that row then just ran longer).
  * Per-row temperature, top-k, top-p, applied in that order as HF's logits processors; temperature 0 is greedy
    (argmax of the raw logits); top_k 0 and top_p 1.0 are off. Randomness: prompt i uses key fold_in(key(seed), i) (or
    key(seed_i) for a per-prompt seed list), folded with the step, so a row's sample does not depend on the batch
    it is in, the batch size, or the mesh.
  * Log-probs returned per token are those of the chosen token under the unmodified model distribution
    (log_softmax of the raw logits, temperature 1), whatever the sampling settings.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .model import CausalTransformer, KVCache, PrefixKV, is_per_layer
from .sharding import DP, MP, cache_specs, make_mesh, named, param_specs, place, replicate_kv

Array = jax.Array
FloatOrSeq = Union[float, Sequence[float]]
IntOrSeq = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------------------------
# Logits processors and token choice
# ---------------------------------------------------------------------------------------------------------------
def _sorted_filtered(logits: Array, temperature: Array, top_k: Array, top_p: Array):
    """Temperature, then top-k, then top-p, in descending-sorted order. Returns (filtered sorted logits with -inf on
    removed tokens [B, V], token id of each sorted position [B, V])."""
    v = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits.astype(jnp.float32) / t[:, None]  # [B, V]
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V]; ties: lower id first
    srt = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V], descending
    rank = jnp.arange(v, dtype=jnp.int32)[None, :]
    keep_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])  # exactly k tokens survive
    srt = jnp.where(keep_k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)  # renormalised over the top-k, as HF's TopP after TopK
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]: mass of the strictly more likely tokens
    # smallest prefix whose mass reaches p: keep a token while the mass before it is still below p (HF TopP)
    keep_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank == 0)
    return jnp.where(keep_p, srt, -jnp.inf), order


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """logits [B, V] -> logits / temperature with -inf on tokens removed by top-k then top-p (per-row [B] settings;
    top_k 0 and top_p >= 1 are off; temperature 0 is treated as 1 here, greedy rows ignore this)."""
    srt, order = _sorted_filtered(logits, temperature, top_k, top_p)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(srt).at[rows, order].set(srt)


def sample_tokens(logits: Array, temperature: Array, top_k: Array, top_p: Array, keys: Array) -> Array:
    """One token per row [B]: argmax where temperature is 0, else a draw from the filtered distribution.

    keys: one PRNG key per row [B]. The Gumbel-max draw uses the noise of the token's id (not its rank), so it is
    the same draw whatever the other rows hold."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]

    def draw():
        srt, order = _sorted_filtered(logits, temperature, top_k, top_p)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)  # [B, V] by id
        noise = jnp.take_along_axis(noise, order, axis=-1)  # [B, V] by rank
        pick = jnp.argmax(srt + noise, axis=-1)  # [B]
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    # an all-greedy batch skips the sort over the vocabulary
    sampled = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
    return jnp.where(temperature > 0, sampled, greedy)


# ---------------------------------------------------------------------------------------------------------------
# Prefill and one decode step over a preallocated cache
# ---------------------------------------------------------------------------------------------------------------
def prefill(model: CausalTransformer, params: Any, tokens: Array, positions: Array, valid: Array,
            slots: int, prefix: Optional[PrefixKV] = None):
    """Runs the prompts tokens [B, Tp] (left-padded) and returns (logits of the last slot [B, V], a KVCache of
    `slots` slots holding the prompts' keys/values in slots [0, Tp))."""
    cache = model.init_cache(tokens.shape[0], slots, per_layer=is_per_layer(params))
    logits, cache = model.forward(params, tokens, positions, valid, cache, prefix, 0, last_only=True)  # [B, 1, V]
    return logits[:, -1], cache


def decode_step(model: CausalTransformer, params: Any, cache: KVCache, tokens: Array, positions: Array, slot,
                prefix: Optional[PrefixKV] = None):
    """Feeds one token per row (tokens, positions [B]); attention writes its keys/values at `slot`.
    Returns (logits [B, V], updated cache)."""
    ones = jnp.ones((tokens.shape[0], 1), bool)
    logits, cache = model.forward(params, tokens[:, None], positions[:, None], ones, cache, prefix,
                                  jnp.asarray(slot, jnp.int32))
    return logits[:, 0], cache


# ---------------------------------------------------------------------------------------------------------------
# The jitted sampler
# ---------------------------------------------------------------------------------------------------------------
class SampleOutput(NamedTuple):
    """tokens[i, :lengths[i]] are row i's new tokens, ending with the EOS / stop token that ended it (if any);
    later entries hold `pad_id`. logprobs: log p(token) under the raw model (temperature 1), 0 past the length."""
    tokens: np.ndarray  # [n, N] int32
    lengths: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n, N] float32


def _generate_impl(model: CausalTransformer, mesh: Mesh, max_new: int, params, prefix: Optional[PrefixKV],
                   prefix_logits, tokens, prompt_len, row_keys, temperature, top_k, top_p, eos_id, stop_mask,
                   stop_seqs):
    """prefill + while_loop decode. tokens [B, Tp] left-padded; prompt_len [B]; row_keys [B, 2] PRNG key data;
    temperature/top_k/top_p [B]; eos_id scalar (-1: none); stop_mask [V] bool; stop_seqs [n, Ls] (-1: wildcard,
    -3: never matches)."""
    b, tp = tokens.shape
    n_prefix = 0 if prefix is None else prefix.length
    slots = tp + max_new - 1  # the last new token's keys are never needed
    kv_sharding = named(mesh, cache_specs(replicate_kv(model.config, mesh),
                                          model.config.layers if is_per_layer(params) else None))
    row = NamedSharding(mesh, P(DP))

    idx = jnp.arange(tp, dtype=jnp.int32)[None, :]
    pad = (tp - prompt_len)[:, None]  # [B, 1]
    valid = idx >= pad  # [B, Tp]
    positions = jnp.where(valid, n_prefix + idx - pad, 0)  # [B, Tp]
    last_logits, cache = prefill(model, params, tokens, positions, valid, slots, prefix)
    cache = jax.lax.with_sharding_constraint(cache, kv_sharding)
    if prefix is not None:  # a row whose text is exactly the prefix continues from the prefix's last logits
        last_logits = jnp.where(prompt_len[:, None] > 0, last_logits, prefix_logits[None, :])
    start = n_prefix + prompt_len  # [B]: position of the first new token

    keys = jax.random.wrap_key_data(row_keys)  # [B]
    pad_id = jnp.maximum(eos_id, 0)
    n_seq, seq_len = stop_seqs.shape

    def choose(logits, step):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        tok = sample_tokens(logits, temperature, top_k, top_p, step_keys)  # [B]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]  # [B]
        return tok, logp

    def ends_row(tok, tail):
        hit = stop_mask[tok] | (tok == eos_id)
        if n_seq:
            match = (stop_seqs[None] == -1) | (stop_seqs[None] == tail[:, None, :])  # [B, n, Ls]
            hit = hit | jnp.any(jnp.all(match, axis=-1), axis=-1)
        return hit

    tok0, logp0 = choose(last_logits, 0)
    tail = jnp.concatenate([jnp.full((b, seq_len - 1), -2, jnp.int32), tok0[:, None]], axis=1)  # [B, Ls]
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok0)
    out_logp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(logp0)
    state = dict(step=jnp.int32(1), cache=cache, tok=tok0, out=out, logp=out_logp, tail=tail,
                 done=ends_row(tok0, tail), lengths=jnp.ones((b,), jnp.int32))

    def cond(s):
        return (s["step"] < max_new) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        logits, cache = decode_step(model, params, s["cache"], s["tok"], start + step - 1, tp + step - 1, prefix)
        cache = jax.lax.with_sharding_constraint(cache, kv_sharding)
        tok, logp = choose(logits, step)
        done = s["done"]
        tok = jnp.where(done, pad_id, tok)
        logp = jnp.where(done, 0.0, logp)
        tail = jnp.where(done[:, None], s["tail"], jnp.concatenate([s["tail"][:, 1:], tok[:, None]], axis=1))
        z = jnp.zeros((), jnp.int32)
        return dict(step=step + 1, cache=cache, tok=tok,
                    out=jax.lax.dynamic_update_slice(s["out"], tok[:, None], (z, step)),
                    logp=jax.lax.dynamic_update_slice(s["logp"], logp[:, None], (z, step)),
                    tail=tail, done=done | ends_row(tok, tail), lengths=s["lengths"] + (~done).astype(jnp.int32))

    state = jax.lax.while_loop(cond, body, state)
    out = jax.lax.with_sharding_constraint(state["out"], NamedSharding(mesh, P(DP, None)))
    return out, jax.lax.with_sharding_constraint(state["lengths"], row), state["logp"]


def bucket_length(n: int) -> int:
    """Padded prompt length for n tokens: powers of two from 8 to 32, multiples of 16 to 256, then of 64 (a few
    compiled shapes; at most 15 padding tokens up to 256: a prefill computes every padded slot, so at the sampler
    benchmark's 80-token prompts multiples of 32 cost 20% more prefill work, BENCHMARKS.md "Sampling")."""
    if n <= 32:
        return max(8, 1 << max(n - 1, 0).bit_length())
    if n <= 256:
        return -(-n // 16) * 16
    return -(-n // 64) * 64


def _per_row(value, n: int, dtype, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        return np.full((n,), arr, dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or one value per prompt ({n}); got shape {arr.shape}")
    return arr


class Sampler:
    """Batched sampling on a ('dp','mp') mesh: rows over 'dp', heads (and the vocabulary) over 'mp'.

    sampler = Sampler(model, params, mesh)
    out = sampler.sample(prompt_ids, max_new_tokens=96)                     # token ids in, SampleOutput out
    texts = sampler.generate(questions, tokenizer, 96, shared_prefix=few_shot)  # text in, completions out
    """

    def __init__(self, model: CausalTransformer, params: Any = None, mesh: Optional[Mesh] = None,
                 prefix_cache_size: int = 4):
        self.model = model
        self.config = model.config
        self.mesh = mesh if mesh is not None else make_mesh(1, jax.devices()[:1])
        # Built once per (model, mesh); params are an argument of every compiled function, so a long-lived sampler
        # serves every model of a run (`set_params`) without tracing or compiling again.
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))  # abstract: nothing allocated
        kv_replicated = replicate_kv(self.config, self.mesh)
        # The sampler runs its own compute copy of the params: cast to the compute dtype and, with layers unrolled,
        # split per layer (model.split_layers), with a per-layer KV cache: XLA's CPU backend copies each slice of a
        # stacked array it feeds to a matmul, which had cost a decode step more than its matmuls.
        self.per_layer = not self.config.scan_layers
        self.input_shardings = named(self.mesh, param_specs(shapes, kv_replicated))  # params as given (stacked)
        compute_shapes = jax.eval_shape(model.split_layers, shapes) if self.per_layer else shapes
        self.param_shardings = named(self.mesh, param_specs(compute_shapes, kv_replicated))  # of self.params
        split = model.split_layers if self.per_layer else (lambda p: p)
        self._cast = jax.jit(lambda p: split(model.cast_for_compute(p)), in_shardings=(self.input_shardings,),
                             out_shardings=self.param_shardings)
        self._generate = jax.jit(functools.partial(_generate_impl, model, self.mesh), static_argnums=(0,))
        heads = None if kv_replicated else MP
        if self.per_layer:
            one = NamedSharding(self.mesh, P(heads, None, None))  # [Hkv, P, Dh] per layer
            prefix_spec = (one,) * self.config.layers
        else:
            prefix_spec = NamedSharding(self.mesh, P(None, heads, None, None))  # [L, Hkv, P, Dh]
        self._prefix_fn = jax.jit(self._prefix_impl, out_shardings=(PrefixKV(prefix_spec, prefix_spec),
                                                                    NamedSharding(self.mesh, P())))
        self._prefixes: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._prefix_cache_size = prefix_cache_size
        self._stop_cache: dict = {}
        self.params = None
        if params is not None:
            self.set_params(params)

    def set_params(self, params: Any) -> None:
        """Makes `params` (host or device arrays, any layout) the model this sampler runs: placed leaf by leaf on
        their shardings and cast to the compute dtype once, so no step re-casts them. Clears the prefix cache.
        With layers under scan (scan_layers), device params already in the compute dtype and layout are used as they
        are, not copied: do not donate them (e.g. to a train step) while this sampler still runs them; unrolled,
        the sampler always holds its own per-layer copy (model.split_layers)."""
        placed = place(params, self.input_shardings)
        dtype = jnp.dtype(self.model.compute_dtype)
        same = all(x.dtype == dtype or not jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(placed))
        self.params = placed if same and not self.per_layer else self._cast(placed)
        self._prefixes.clear()

    def init_params(self, seed: int = 0) -> None:
        """Runs a freshly initialised model, created on the mesh in its shardings (`model.init` under jit)."""
        init = jax.jit(self.model.init, out_shardings=self.input_shardings)
        self.set_params(init(jax.random.PRNGKey(seed)))

    def clear_params(self) -> None:
        """Drops the compute-dtype copy of the params (e.g. while the same devices train); set_params restores."""
        self.params = None
        self._prefixes.clear()

    def _params(self):
        if self.params is None:
            raise ValueError("this Sampler has no params; call set_params(params) first")
        return self.params

    @property
    def dp(self) -> int:
        return self.mesh.shape[DP]

    # ----------------------------------------------------------------- shared prefix
    def _prefix_impl(self, params, tokens):
        return self.model.prefix_kv(params, tokens)  # PrefixKV [L, Hkv, P, Dh], logits [V]

    def prefix_kv(self, prefix_ids: Sequence[int]) -> tuple[PrefixKV, Array]:
        """(PrefixKV [L, H, P, Dh], logits after the prefix [V]), computed once per distinct prefix (LRU)."""
        key = tuple(int(i) for i in prefix_ids)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return self._prefixes[key]
        value = self._prefix_fn(self._params(), jnp.asarray([key], jnp.int32))
        self._prefixes[key] = value
        while len(self._prefixes) > self._prefix_cache_size:
            self._prefixes.popitem(last=False)
        return value

    # ----------------------------------------------------------------- token ids in, token ids out
    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: FloatOrSeq = 0.0,
               top_k: IntOrSeq = 0, top_p: FloatOrSeq = 1.0, seed: IntOrSeq = 0, eos_id: Optional[int] = None,
               stop_tokens: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (),
               prefix: Optional[Sequence[int]] = None, batch_size: Optional[int] = None) -> SampleOutput:
        """Continues each prompt (token ids, after `prefix` when given) by up to max_new_tokens tokens.

        temperature/top_k/top_p: a value or one per prompt. seed: an int (row i draws with fold_in(key(seed), i))
        or one seed per prompt. eos_id None: never stop at EOS (benchmarks). Prompts are run in batches of
        batch_size (default: all at once), sorted by length for less padding; the last batch is padded with dummy
        rows, never dropped. Results come back in the prompts' order.
        """
        n = len(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if n == 0:
            return SampleOutput(np.zeros((0, max_new_tokens), np.int32), np.zeros((0,), np.int32),
                                np.zeros((0, max_new_tokens), np.float32))
        prompts = [list(map(int, p)) for p in prompts]
        if prefix is not None and len(prefix) == 0:
            prefix = None
        if prefix is None and any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt has nothing to condition on; give it at least one token (e.g. EOS) "
                             "or pass a shared prefix")
        longest = max(len(p) for p in prompts) + (len(prefix) if prefix is not None else 0)
        if longest + max_new_tokens > self.config.seq:
            print(f"warning: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's seq "
                  f"{self.config.seq}; positions beyond it were never trained")
        temperature = _per_row(temperature, n, np.float32, "temperature")
        top_k = _per_row(top_k, n, np.int32, "top_k")
        top_p = _per_row(top_p, n, np.float32, "top_p")
        if np.any(temperature < 0) or np.any(top_p <= 0):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        row_keys = self._row_keys(seed, n)

        v = self.config.n_vocab
        stop_mask = np.zeros((v,), bool)
        stop_ids = np.asarray(list(stop_tokens), np.int64)
        stop_mask[stop_ids[(stop_ids >= 0) & (stop_ids < v)]] = True
        seqs = [list(map(int, s)) for s in stop_sequences if len(s) > 0]
        # a fixed shape (multiples of 4) so that other stop strings reuse the compiled sampler; rows of -3 never
        # match, -1 is a wildcard left of a shorter sequence
        seq_len = max(4, -(-max([len(s) for s in seqs], default=1) // 4) * 4)
        stop_seqs = np.full((max(4, -(-len(seqs) // 4) * 4), seq_len), -3, np.int32)
        for i, s in enumerate(seqs):
            stop_seqs[i, :seq_len - len(s)] = -1
            stop_seqs[i, seq_len - len(s):] = s
        eos = np.int32(-1 if eos_id is None else eos_id)

        prefix_kv, prefix_logits = self.prefix_kv(prefix) if prefix is not None else (None, None)
        batch_size = batch_size or n
        batch_size = -(-batch_size // self.dp) * self.dp  # rows are split over dp
        order = sorted(range(n), key=lambda i: -len(prompts[i]))
        tokens_out = np.zeros((n, max_new_tokens), np.int32)
        lengths_out = np.zeros((n,), np.int32)
        logp_out = np.zeros((n, max_new_tokens), np.float32)
        rows, rows2d = NamedSharding(self.mesh, P(DP)), NamedSharding(self.mesh, P(DP, None))
        # every batch has b rows (dummies fill the last); fewer prompts than batch_size round up to a power of two,
        # so calls with varying small counts reuse a few compiled shapes
        b = min(batch_size, 1 << (min(n, batch_size) - 1).bit_length())
        b = -(-b // self.dp) * self.dp
        for lo in range(0, n, batch_size):
            idx = order[lo:lo + batch_size]
            tp = bucket_length(max(len(prompts[i]) for i in idx))
            toks = np.zeros((b, tp), np.int32)
            plen = np.zeros((b,), np.int32)
            for r, i in enumerate(idx):
                toks[r, tp - len(prompts[i]):] = prompts[i]
                plen[r] = len(prompts[i])
            if prefix is None:
                plen[len(idx):] = 1  # dummy rows: one token each, so they stay well defined

            def fill(a, dummy):
                return np.concatenate([a[idx], np.full((b - len(idx),) + a.shape[1:], dummy, a.dtype)])

            out, lengths, logp = self._generate(
                max_new_tokens, self._params(), prefix_kv, prefix_logits, jax.device_put(toks, rows2d),
                jax.device_put(plen, rows), jax.device_put(fill(row_keys, 0), rows2d),
                jax.device_put(fill(temperature, 0.0), rows), jax.device_put(fill(top_k, 0), rows),
                jax.device_put(fill(top_p, 1.0), rows), eos, stop_mask, stop_seqs)
            out, lengths, logp = jax.device_get((out, lengths, logp))
            tokens_out[idx] = out[:len(idx)]
            lengths_out[idx] = lengths[:len(idx)]
            logp_out[idx] = logp[:len(idx)]
        return SampleOutput(tokens_out, lengths_out, logp_out)

    @staticmethod
    def _row_keys(seed: IntOrSeq, n: int) -> np.ndarray:
        """Raw key data [n, 2] uint32: fold_in(key(seed), i) for an int seed, key(seed_i) for a list."""
        if np.ndim(seed) == 0:
            base = jax.random.key(int(seed))
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n, dtype=jnp.uint32))
        else:
            seeds = _per_row(seed, n, np.int64, "seed")
            keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        return np.asarray(jax.random.key_data(keys))

    # ----------------------------------------------------------------- text in, text out
    def stop_token_ids(self, tokenizer: Any, stop: str) -> np.ndarray:
        """Ids of every vocabulary token whose decoded text contains `stop` (cached per tokenizer and string)."""
        key = (getattr(tokenizer, "name", repr(tokenizer)), stop)
        if key not in self._stop_cache:
            self._stop_cache[key] = tokens_containing(tokenizer, stop, self.config.n_vocab)
        return self._stop_cache[key]

    def generate(self, texts: Sequence[str], tokenizer: Any, max_new_tokens: int, temperature: FloatOrSeq = 0.0,
                 top_k: IntOrSeq = 0, top_p: FloatOrSeq = 1.0, stop: Sequence[str] = ("\n",), seed: IntOrSeq = 0,
                 shared_prefix: Optional[str] = None, batch_size: int = 8) -> list[str]:
        """Completions of `texts` (each cut before the first stop string; EOS removed).

        shared_prefix: text every entry of `texts` starts with (the few-shot exemplars); its keys/values are computed
        once and reused across batches and calls. The split is made on tokens (`split_shared_prefix`), so results
        are identical to running the full texts. batch_size: rows per compiled batch (the last batch is padded).
        Row i samples with fold_in(key(seed), i), independent of batch_size.
        """
        prefix, rows = split_shared_prefix(tokenizer, texts, shared_prefix)
        return self.complete(rows, tokenizer, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             stop=stop, seed=seed, prefix=prefix, batch_size=batch_size)

    def complete(self, rows: Sequence[Sequence[int]], tokenizer: Any, max_new_tokens: int,
                 temperature: FloatOrSeq = 0.0, top_k: IntOrSeq = 0, top_p: FloatOrSeq = 1.0,
                 stop: Sequence[str] = ("\n",), seed: IntOrSeq = 0, prefix: Optional[Sequence[int]] = None,
                 batch_size: int = 8) -> list[str]:
        """`generate` on prompts already tokenized (each row's own ids after the shared `prefix` ids): for callers
        that need the token counts anyway, so nothing is tokenized twice."""
        if isinstance(stop, str):
            stop = (stop,)
        stop = [s for s in stop if s]
        out = self.sample(rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          eos_id=tokenizer.eos_token_id, prefix=prefix, batch_size=batch_size,
                          **self.stop_arguments(tokenizer, stop))
        return [decode_completion(tokenizer, toks, n, stop) for toks, n in zip(out.tokens, out.lengths)]

    def stop_arguments(self, tokenizer: Any, stop: Sequence[str]) -> dict:
        """`sample`'s stop_tokens and stop_sequences for stop strings: every token containing one (device-side, one
        step), and the multi-token encodings (matched against the row's last tokens)."""
        stop = [s for s in stop if s]
        ids = [self.stop_token_ids(tokenizer, s) for s in stop]
        return dict(stop_tokens=np.unique(np.concatenate(ids)) if ids else np.zeros((0,), np.int64),
                    stop_sequences=[seq for seq in (tokenizer.encode(s) for s in stop) if len(seq) > 1])


def split_shared_prefix(tokenizer: Any, texts: Sequence[str], shared_prefix: Optional[str]):
    """(prefix ids or None, each text's own ids) such that prefix + own == the text's full tokenization (after the
    tokenizer's BOS, when it has one: Llama 2/3 and Mistral prompts start with it, as HF's `tokenizer(text)` does).

    The prefix is the longest run of shared_prefix's tokens that every text's tokenization starts with: BPE may merge
    across the boundary (GPT-2 encodes a prefix ending in "\\n\\n" as one token, but "\\n\\nQ" as "\\n", "\\n", "Q"),
    and then the prefix gives back its last token(s) to the rows, so results equal those of the full texts."""
    texts = list(texts)
    rows = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(t) for t in texts]
    bos = getattr(tokenizer, "bos_token_id", None)  # every prompt starts with it, as HF's tokenizer(text) does
    rows = [([bos] if bos is not None else []) + list(r) for r in rows]
    if not shared_prefix:
        return None, rows
    bad = [i for i, t in enumerate(texts) if not t.startswith(shared_prefix)]
    if bad:
        raise ValueError(f"text {bad[0]} does not start with shared_prefix; pass texts that all begin with it "
                         f"(or shared_prefix=None)")
    pids = ([bos] if bos is not None else []) + list(tokenizer.encode(shared_prefix))
    p = len(pids)
    for r in rows:
        p = min(p, _common_prefix(pids, r))
    return (pids[:p] or None), [r[p:] for r in rows]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decode_completion(tokenizer: Any, tokens: Sequence[int], length: int, stop: Sequence[str]) -> str:
    """A row's text from SampleOutput tokens[:length]: EOS dropped, cut before the first stop string."""
    ids = [int(t) for t in tokens[:length]]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return truncate_at_stop(tokenizer.decode(ids), [s for s in stop if s])


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    cut = min([i for i in (text.find(s) for s in stop if s) if i >= 0], default=len(text))
    return text[:cut]


def tokens_containing(tokenizer: Any, text: str, n_vocab: int) -> np.ndarray:
    """Ids (< n_vocab) of every token whose decoded text contains `text`: the device-side stop set of a stop string.
    Exact for a stop string inside one token, whatever else the token holds (GPT-2: "\\n", "\\n\\n", "\\n\\n\\n")."""
    size = min(int(getattr(tokenizer, "vocab_size", n_vocab)), n_vocab)
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:  # one batched call instead of 50k
        pieces = hf.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
    else:
        pieces = [tokenizer.decode([i]) for i in range(size)]
    return np.asarray([i for i, piece in enumerate(pieces) if text in piece], np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Memory arithmetic (no allocation)
# ---------------------------------------------------------------------------------------------------------------
def kv_cache_bytes(config: Any, batch: int, slots: int, prefix_len: int = 0, dtype_bytes: int = 2) -> int:
    """Bytes of keys + values for `batch` rows of `slots` slots plus one shared prefix of prefix_len tokens."""
    per_token = 2 * config.layers * config.kv_heads * config.d_head * dtype_bytes
    return per_token * (batch * slots + prefix_len)


def sampler_kv_bytes(config: Any, batch: int, prompt: int, max_new: int, prefix_len: int = 0,
                     dtype_bytes: int = 2) -> int:
    """What Sampler allocates: slots = bucket_length(prompt) + max_new - 1 per row, plus the prefix once."""
    return kv_cache_bytes(config, batch, bucket_length(prompt) + max_new - 1, prefix_len, dtype_bytes)
