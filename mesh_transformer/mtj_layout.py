"""Names, leaf order and per-shard rules of mesh-transformer-jax's (mtj) v1 checkpoint layout, against our tree.

Facts from the original (`mesh_transformer/layers.py`, `transformer_shard.py`, `checkpoint.py`, `to_hf_weights.py`):
- mtj's state is `{"opt_state", "params", "step"}`; every leaf carries a leading shard axis under xmap, and shard s
  writes leaf[s], so files hold per-shard slices WITHOUT the shard axis (scalars for the step and counters).
- The leaf list is `jax.tree_flatten(state)`: dict keys sorted, so opt_state < params < step; Haiku module names
  sort as strings (`layer_0, layer_1, layer_10, ..., layer_2, ...`), `embedding_shard` first, `projection_shard`
  last. The optax chain (scale, clip, scale_by_adam, weight decay, scale, scale_by_schedule) contributes, in order:
  Adam's count, mu (one leaf per param), nu (one per param), the schedule's count.
- Per layer, modules are named in creation order: `linear`=q, `linear_1`=v, `linear_2`=k, `linear_3`=out,
  `linear_4`=fc_in, `linear_5`=fc_out, plus `replicated_layer_norm`.
- Shard cuts: q/k/v/fc_in/lm_head on the output dim, out/fc_out/embedding on the input dim (the vocabulary for the
  embedding). The embedding bias and the fc_out bias are added on every shard before a psum, so the real bias is
  the SUM of the shard copies. `ReplicatedLayerNorm` uses `all_gather(param)[0]`: only shard 0's copy is used and
  trained; the other shards keep their init (scale 1, offset 0) and get zero gradients (zero Adam moments).
- Every shard's copy of a summed bias receives the full gradient (mtj's g_psum has an identity backward), so the
  Adam moments of those biases are the same on every shard.

With L layers there are P = 10 L + 6 params; a params-only ("slim") checkpoint has P + 1 leaves per shard (287 for
GPT-J-6B) and a full one 3 P + 3 (861).

How we write the leaves that are not plain cuts (every choice reads back bit-exactly and matches what mtj itself
would hold, so mtj's own `read_ckpt`/`reshard` and `to_hf_weights.py` read our files):
- summed biases: the real value on shard 0, zeros on the others (mtj's native files hold value/S on each shard,
  which reads back to the same sum, but dividing is not bit-exact);
- LayerNorm params: the real value on shard 0, init values (scale 1, offset 0) on the others, as in mtj;
- Adam moments: cut like their param, except LayerNorm (shard 0, zeros elsewhere, as mtj) and summed biases (the
  same value on every shard, as mtj);
- counters and the step: the same scalar on every shard.
Reading takes shard 0 for everything that is not cut, except the summed-bias params, which are summed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .weights import PREFIX, SPLIT, SUMMED, WEIGHTS, Weight, dim_value  # noqa: F401 (PREFIX, dim_value re-exported)

PIECES = 16  # files per shard (mtj's `pieces`)

# The rules (our name, mtj name, cut) are the one weight table's (weights.py); ParamRule is its row type.
ParamRule = Weight
RULES: Tuple[ParamRule, ...] = WEIGHTS

# groups of leaves in the mtj state
PARAMS, MU, NU, ADAM_COUNT, SCHEDULE_COUNT, STEP = "params", "mu", "nu", "adam_count", "schedule_count", "step"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One entry of mtj's flattened state: a param (or its Adam moment) of one layer, a counter or the step."""
    group: str
    rule: Optional[ParamRule] = None
    layer: Optional[int] = None

    @property
    def mtj_path(self) -> str:
        prefix = {PARAMS: "params/", MU: "opt_state/adam.mu/", NU: "opt_state/adam.nu/"}
        if self.rule is None:
            return {ADAM_COUNT: "opt_state/adam.count", SCHEDULE_COUNT: "opt_state/schedule.count",
                    STEP: "step"}[self.group]
        return prefix[self.group] + self.rule.mtj_path(self.layer)

    @property
    def our_path(self) -> str:
        if self.rule is None:
            return {ADAM_COUNT: "opt_state: scale_by_adam count", SCHEDULE_COUNT: "opt_state: scale_by_schedule count",
                    STEP: "step"}[self.group]
        where = {PARAMS: "params", MU: "opt_state: Adam mu of", NU: "opt_state: Adam nu of"}[self.group]
        return f"{where} {self.rule.our_path(self.layer)}"


def param_leaves(layers: int) -> List[Tuple[ParamRule, Optional[int]]]:
    """(rule, layer) for every mtj param leaf, in mtj's flatten order (module, then leaf name, as strings)."""
    entries = []
    for rule in RULES:
        for layer in (range(layers) if rule.stacked else [None]):
            entries.append(((PREFIX + rule.mtj_module.format(i=layer), rule.mtj_name), rule, layer))
    entries.sort(key=lambda e: e[0])
    return [(rule, layer) for _, rule, layer in entries]


def leaf_list(layers: int, with_opt: bool) -> List[Leaf]:
    """mtj's flattened state for one shard: [count, mu..., nu..., count] + params... + [step]."""
    params = param_leaves(layers)
    leaves: List[Leaf] = []
    if with_opt:
        leaves.append(Leaf(ADAM_COUNT))
        leaves += [Leaf(MU, r, i) for r, i in params]
        leaves += [Leaf(NU, r, i) for r, i in params]
        leaves.append(Leaf(SCHEDULE_COUNT))
    leaves += [Leaf(PARAMS, r, i) for r, i in params]
    leaves.append(Leaf(STEP))
    return leaves


def n_params(layers: int) -> int:
    return 10 * layers + 6


def leaf_count(layers: int, with_opt: bool) -> int:
    p = n_params(layers)
    return 3 * p + 3 if with_opt else p + 1


def infer_layout(n_leaves: int) -> List[Tuple[int, bool]]:
    """The (layers, with_opt) layouts that have n_leaves leaves per shard."""
    out = []
    if (n_leaves - 7) % 10 == 0 and n_leaves >= 7:
        out.append(((n_leaves - 7) // 10, False))
    if n_leaves % 3 == 0 and (n_leaves // 3 - 7) % 10 == 0 and n_leaves >= 21:
        out.append(((n_leaves // 3 - 7) // 10, True))
    return out


def chunk_bounds(n: int, pieces: int = PIECES) -> List[Tuple[int, int]]:
    """mtj's `split(a, n)` (the same cut as np.array_split): the first n % pieces chunks get one more leaf."""
    k, m = divmod(n, pieces)
    return [(i * k + min(i, m), (i + 1) * k + min(i + 1, m)) for i in range(pieces)]


# ------------------------------------------------------------------------------------------ shapes
def require_gptj(cfg: Any) -> None:
    """The v1 layout is GPT-J's; a Llama-family model has no mtj counterpart."""
    if getattr(cfg, "is_llama", False):
        raise ValueError(f"model_type {cfg.model_type!r} has no mesh-transformer-jax v1 checkpoint layout (it is "
                         f"GPT-J's); save the model as an HF folder (mesh_transformer.hf.save_hf) and load it "
                         f"with --hf. Its fine-tune checkpoints are HF folders (checkpoint.save_checkpoint, "
                         f"hf_checkpoint.py)")


def full_shape(rule: ParamRule, cfg: Any) -> Tuple[int, ...]:
    """Shape of the unstacked (one layer) leaf in our layout."""
    require_gptj(cfg)
    return tuple(dim_value(cfg, k) for k in rule.dims)


def shard_shape(rule: ParamRule, cfg: Any, shards: int) -> Tuple[int, ...]:
    shape = list(full_shape(rule, cfg))
    if rule.kind == SPLIT:
        shape[rule.axis] //= shards
    return tuple(shape)


def shard_divisors(cfg: Any) -> Sequence[Tuple[str, int]]:
    """Config sizes a shard count must divide (heads stay whole on a shard, as mtj)."""
    require_gptj(cfg)
    return (("n_heads", cfg.n_heads), ("n_vocab", cfg.n_vocab), ("d_ff", cfg.ffn_dim), ("d_model", cfg.d_model))


# ------------------------------------------------------------------------------------------ cut and join
def cut(leaf: Leaf, x: np.ndarray, shards: int) -> List[np.ndarray]:
    """The per-shard arrays of one full (unsharded, one layer) leaf."""
    rule = leaf.rule
    if rule is None:  # counters and the step
        return [x] * shards
    if rule.kind == SPLIT:
        return np.split(x, shards, axis=rule.axis)
    if leaf.group == PARAMS:
        rest = np.zeros_like(x) if rule.kind == SUMMED else np.full_like(x, rule.fill)
    else:  # Adam moments: a summed bias has the full gradient on every shard; LayerNorm only on shard 0
        rest = x if rule.kind == SUMMED else np.zeros_like(x)
    return [x] + [rest] * (shards - 1)


def join(leaf: Leaf, parts: Sequence[np.ndarray]) -> np.ndarray:
    """The full leaf from its per-shard arrays (any number of shards)."""
    rule = leaf.rule
    if rule is not None and rule.kind == SPLIT:
        return np.concatenate(parts, axis=rule.axis)
    if rule is not None and rule.kind == SUMMED and leaf.group == PARAMS and len(parts) > 1:
        if not any(np.any(p != 0) for p in parts[1:]):
            return parts[0]  # our own layout: bit-exact, keeps -0.0
        total = np.zeros(parts[0].shape, np.float64)
        for p in parts:
            total += p.astype(np.float64)
        return total.astype(parts[0].dtype)
    return parts[0]
