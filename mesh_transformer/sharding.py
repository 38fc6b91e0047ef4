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

DP, MP = "dp", "mp"

# (module suffix, leaf name) -> spec of the UNSTACKED leaf; stacked layer leaves get a leading None.
_RULES = {
    ("embedding", "w"): P(MP, None),  # [V, D]: vocabulary split
    ("embedding", "b"): P(None),
    ("q", "w"): P(None, MP),  # [D, H*Dh]: heads split
    ("k", "w"): P(None, MP),
    ("v", "w"): P(None, MP),
    ("out", "w"): P(MP, None),  # [H*Dh, D]: input dim split
    ("fc_in", "w"): P(None, MP),  # [D, F]
    ("fc_in", "b"): P(MP),
    ("fc_out", "w"): P(MP, None),  # [F, D]
    ("fc_out", "b"): P(None),
    ("ln", "scale"): P(None),
    ("ln", "offset"): P(None),
    ("ln_f", "scale"): P(None),
    ("ln_f", "offset"): P(None),
    ("lm_head", "w"): P(None, MP),  # [D, V]: vocabulary split
    ("lm_head", "b"): P(MP),
}


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
    return module_path.startswith("layers")


def leaf_spec(module_path: str, name: str) -> P:
    suffix = module_path.split("/")[-1]
    try:
        spec = _RULES[(suffix, name)]
    except KeyError:
        raise KeyError(f"no sharding rule for parameter {module_path}/{name}; add one to sharding._RULES")
    return P(None, *spec) if is_stacked(module_path) else spec


def param_specs(params: Any) -> Any:
    """PartitionSpecs with the structure of a Haiku params dict."""
    return {mod: {name: leaf_spec(mod, name) for name in leaves} for mod, leaves in params.items()}


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


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs -> NamedShardings on mesh."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places params on the mesh in the Megatron layout."""
    return jax.device_put(params, named(mesh, param_specs(params)))


def batch_spec(ndim: int) -> P:
    """[..., B, T] token batches: the batch axis (second to last) split over 'dp'."""
    return P(*([None] * (ndim - 2)), DP, None)


def cache_specs() -> Any:
    """Specs for mesh_transformer.model.KVCache: k/v [L, B, S, H, Dh] rows over dp, heads over mp."""
    from .model import KVCache
    kv = P(None, DP, None, MP, None)
    return KVCache(kv, kv, P(DP, None), P(DP, None))
