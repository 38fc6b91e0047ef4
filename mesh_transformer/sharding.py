"""Megatron-style model parallelism on a `Mesh(('dp','mp'))`, the modern form of mtj's xmap/pjit layout.

mtj split every matrix over its "shard" axis: q/k/v/fc_in/lm_head on the output dim, out/fc_out on the input dim,
the embedding on the vocabulary. We keep that layout as PartitionSpecs and let `jax.jit` (GSPMD) insert the
all-reduces mtj wrote by hand. The batch is split over 'dp'; the KV cache over 'dp' (rows) and 'mp' (heads).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .weights import LLAMA_WEIGHTS, SPLIT, WEIGHTS, Weight

DP, MP = "dp", "mp"



def _spec(weight: Weight) -> P:
    """The unstacked leaf's spec: 'mp' on the axis the weight table says mp splits (mtj's cut), else replicated."""
    axes = [None] * len(weight.dims)
    if weight.kind == SPLIT:
        axes[weight.axis] = MP
    return P(*axes)


# (module suffix, leaf name) -> spec of the UNSTACKED leaf; stacked layer leaves get a leading None. From the one
# weight table (weights.py): [V, D] embedding and [D, V] lm_head split on the vocabulary, q/k/v/fc_in on their output
# (heads, F), out/fc_out on their input; biases of split outputs split with them; LayerNorms and summed biases
# replicated.
# Both families' tables: a leaf named in both (q, out, ln_f, lm_head, embedding) is split the same way in both.
_RULES = {(w.suffix, w.name): _spec(w) for w in WEIGHTS + LLAMA_WEIGHTS}
assert all(_RULES[(w.suffix, w.name)] == _spec(w) for w in WEIGHTS), "weights.py: a leaf split two ways"


def make_mesh(cores_per_replica: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (device_count // cores_per_replica, cores_per_replica) mesh with axes ('dp', 'mp')."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if cores_per_replica < 1 or n % cores_per_replica:
        raise ValueError(f"cores_per_replica={cores_per_replica} must divide the number of devices ({n}); "
                         f"set it in the config to a divisor of {n}")
    grid = np.asarray(devices).reshape(n // cores_per_replica, cores_per_replica)
    return Mesh(grid, (DP, MP))


def is_stacked(module_path: str) -> bool:
    """Per-layer leaves live under the layer stack and carry a leading [L] axis."""
    return module_path.startswith("layers/")


def leaf_spec(module_path: str, name: str, replicate_kv: bool = False) -> P:
    suffix = module_path.split("/")[-1]
    try:
        spec = _RULES[(suffix, name)]
    except KeyError:
        raise KeyError(f"no sharding rule for parameter {module_path}/{name}; add the weight to weights.WEIGHTS")
    if replicate_kv and suffix in ("k", "v"):
        spec = P(*([None] * len(spec)))
    return P(None, *spec) if is_stacked(module_path) else spec


def replicate_kv(cfg: Any, mesh: Mesh) -> bool:
    """Whether the kv heads are replicated over 'mp' (grouped-query models whose kv heads 'mp' does not divide);
    otherwise they are split over it as the query heads are."""
    return cfg.kv_heads % mesh.shape[MP] != 0


def param_specs(params: Any, replicate_kv: bool = False) -> Any:
    """PartitionSpecs with the structure of a Haiku params dict (k/v replicated with replicate_kv)."""
    return {mod: {name: leaf_spec(mod, name, replicate_kv) for name in leaves} for mod, leaves in params.items()}


def tree_specs_like_params(tree: Any, params: Any, specs: Any) -> Any:
    """Specs for a tree (an optimizer state) whose params-shaped subtrees take the params' specs; other leaves
    (step counters) are replicated."""
    param_def = jax.tree.structure(params)

    def is_params_like(x):
        try:
            return jax.tree.structure(x) == param_def
        except Exception:  # pragma: no cover
            return False

    return jax.tree.map(lambda x: specs if is_params_like(x) else P(), tree, is_leaf=is_params_like)


def zero_spec(spec: P, shape: Sequence[int], dp_size: int) -> P:
    """ZeRO's storage layout of a leaf whose compute layout is `spec`: also split over 'dp', on the largest axis
    that is not split yet and that dp divides (GPT-J-6B on dp 8: d_model 4096 or the vocabulary). A leaf with no
    such axis (a scalar, a [28] counter) stays replicated over dp: it is small."""
    axes = list(spec) + [None] * (len(shape) - len(spec))
    if dp_size <= 1 or DP in axes:
        return spec
    free = [i for i, a in enumerate(axes) if a is None and shape[i] % dp_size == 0 and shape[i] >= dp_size]
    if not free:
        return spec
    best = max(free, key=lambda i: (shape[i], -i))
    axes[best] = DP
    return P(*axes)


def zero_specs(specs: Any, shapes: Any, dp_size: int) -> Any:
    """zero_spec over a tree of specs and the matching tree of shapes (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda s, x: zero_spec(s, x.shape, dp_size), specs, shapes,
                        is_leaf=lambda x: isinstance(x, P))


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs -> NamedShardings on mesh."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def place(tree: Any, shardings: Any, host_dtype: Any = None) -> Any:
    """Puts each leaf on its sharding, leaf by leaf: a host leaf (optionally cast to host_dtype first) goes straight to
    its shards, a device leaf already in its sharding is kept as it is, another device leaf is resharded. No leaf
    passes whole through one device."""
    def put(x, s):
        if isinstance(x, jax.Array):
            return x if x.sharding == s else jax.device_put(x, s)
        return jax.device_put(np.asarray(x, host_dtype) if host_dtype is not None else x, s)
    return jax.tree.map(put, tree, shardings)


def shard_params(params: Any, mesh: Mesh, replicate_kv: bool = False) -> Any:
    """Places params on the mesh in the Megatron layout."""
    return jax.device_put(params, named(mesh, param_specs(params, replicate_kv)))


def batch_spec(ndim: int) -> P:
    """[..., B, T] token batches: the batch axis (second to last) split over 'dp'."""
    return P(*([None] * (ndim - 2)), DP, None)


def cache_specs(replicate_kv: bool = False, per_layer: Optional[int] = None) -> Any:
    """Specs for mesh_transformer.model.KVCache: k/v [L, B, Hkv, S, Dh] rows over dp, kv heads over mp (unless
    replicated: see replicate_kv); per_layer=L: tuples of L [B, Hkv, S, Dh] (model.split_layers' cache)."""
    from .model import KVCache
    heads = None if replicate_kv else MP
    if per_layer is not None:
        kv = (P(DP, heads, None, None),) * per_layer
    else:
        kv = P(None, DP, heads, None, None)
    return KVCache(kv, kv, P(DP, None), P(DP, None))
