"""Every fact about each GPT-J weight in one table: our Haiku name, its shape in config keys, the axis that `mp`
splits, its mesh-transformer-jax (v1 checkpoint) module, name and cut, and its HF `GPTJForCausalLM` name and
transpose. sharding.py (PartitionSpecs), mtj_layout.py (the v1 leaf list and per-shard cuts) and hf.py (HF import and
export) derive their tables from this one, so a weight is described once (levanter keeps each module's HF key map
beside the module; MaxText names logical axes once).

Cuts (mtj): SPLIT leaves are cut over shards along `axis`, which is also the axis `mp` splits on the mesh; SUMMED
leaves (the embedding bias, fc_out's bias) are added on every shard before a psum, so the real value is the sum of
the shard copies; REPLICATED leaves (LayerNorms) are read from shard 0, the others keep mtj's init (`fill`). Both are
replicated on the mesh.

HF: `hf_name` is the state-dict key ("{i}" for the layer index) and `hf_transpose` whether torch's [out, in] layout
is the transpose of ours ([in, out]). The embedding bias has no HF tensor: HF folds it into `wte` (wte = W + b).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

PREFIX = "causal_transformer_shard/~/"  # mtj's root module
SPLIT, SUMMED, REPLICATED = "split", "summed", "replicated"


@dataclasses.dataclass(frozen=True)
class Weight:
    """One leaf of our param tree (per layer for stacked leaves) and its mtj and HF counterparts."""
    module: str  # our Haiku module path, e.g. "layers/block/q"
    name: str  # our leaf name, e.g. "w"
    mtj_module: str  # mtj module under PREFIX; "{i}" is the layer index
    mtj_name: str
    kind: str  # SPLIT, SUMMED or REPLICATED
    axis: Optional[int]  # the axis cut over shards and split over 'mp' (SPLIT only), of the unstacked leaf
    dims: Tuple[str, ...]  # the config key that sets each axis of the unstacked leaf
    hf_name: Optional[str]  # HF state-dict key ("{i}": layer index); None: no HF tensor of its own
    hf_transpose: bool = False  # HF stores the transpose ([out, in])
    fill: float = 0.0  # value of shards > 0 for REPLICATED params (mtj's init)
    when: Optional[str] = None  # the weight exists only when this holds: "qkv_bias", "untied" (Llama family)

    def present(self, cfg: Any) -> bool:
        """Whether a model of this config has the weight."""
        if self.when == "qkv_bias":
            return bool(cfg.qkv_bias)
        if self.when == "untied":
            return not cfg.tie_word_embeddings
        return True

    @property
    def stacked(self) -> bool:
        """Per-layer leaves live under the layer stack and carry a leading [L] axis."""
        return self.module.startswith("layers")

    @property
    def suffix(self) -> str:
        """The last part of the module path (q, fc_in, ln_f, ...)."""
        return self.module.split("/")[-1]

    def mtj_path(self, layer: Optional[int]) -> str:
        return PREFIX + self.mtj_module.format(i=layer) + "/" + self.mtj_name

    def our_path(self, layer: Optional[int]) -> str:
        return f"{self.module}/{self.name}" + (f"[layer {layer}]" if layer is not None else "")


def dim_value(cfg: Any, key: str) -> int:
    """The size a config gives to a dims key ("d_ff" is the derived ffn_dim, "kv_dim" the kv heads' width)."""
    if key == "d_ff":
        return cfg.ffn_dim
    if key == "kv_dim":
        return cfg.kv_heads * cfg.d_head
    return getattr(cfg, key)


_LN = "layer_{i}/~/replicated_layer_norm"
_H = "transformer.h.{i}."
WEIGHTS: Tuple[Weight, ...] = (
    Weight("embedding", "w", "embedding_shard/~/linear", "w", SPLIT, 0, ("n_vocab", "d_model"),
           "transformer.wte.weight"),  # HF: W + b
    Weight("embedding", "b", "embedding_shard/~/linear", "b", SUMMED, None, ("d_model",), None),
    Weight("layers/block/q", "w", "layer_{i}/~/linear", "w", SPLIT, 1, ("d_model", "d_model"),
           _H + "attn.q_proj.weight", True),
    Weight("layers/block/v", "w", "layer_{i}/~/linear_1", "w", SPLIT, 1, ("d_model", "d_model"),
           _H + "attn.v_proj.weight", True),
    Weight("layers/block/k", "w", "layer_{i}/~/linear_2", "w", SPLIT, 1, ("d_model", "d_model"),
           _H + "attn.k_proj.weight", True),
    Weight("layers/block/out", "w", "layer_{i}/~/linear_3", "w", SPLIT, 0, ("d_model", "d_model"),
           _H + "attn.out_proj.weight", True),
    Weight("layers/block/fc_in", "w", "layer_{i}/~/linear_4", "w", SPLIT, 1, ("d_model", "d_ff"),
           _H + "mlp.fc_in.weight", True),
    Weight("layers/block/fc_in", "b", "layer_{i}/~/linear_4", "b", SPLIT, 0, ("d_ff",), _H + "mlp.fc_in.bias"),
    Weight("layers/block/fc_out", "w", "layer_{i}/~/linear_5", "w", SPLIT, 0, ("d_ff", "d_model"),
           _H + "mlp.fc_out.weight", True),
    Weight("layers/block/fc_out", "b", "layer_{i}/~/linear_5", "b", SUMMED, None, ("d_model",),
           _H + "mlp.fc_out.bias"),
    Weight("layers/block/ln", "scale", _LN, "scale", REPLICATED, None, ("d_model",), _H + "ln_1.weight", fill=1.0),
    Weight("layers/block/ln", "offset", _LN, "offset", REPLICATED, None, ("d_model",), _H + "ln_1.bias", fill=0.0),
    Weight("projection/ln_f", "scale", "projection_shard/~/replicated_layer_norm", "scale", REPLICATED, None,
           ("d_model",), "transformer.ln_f.weight", fill=1.0),
    Weight("projection/ln_f", "offset", "projection_shard/~/replicated_layer_norm", "offset", REPLICATED, None,
           ("d_model",), "transformer.ln_f.bias", fill=0.0),
    Weight("projection/lm_head", "w", "projection_shard/~/linear", "w", SPLIT, 1, ("d_model", "n_vocab"),
           "lm_head.weight", True),
    Weight("projection/lm_head", "b", "projection_shard/~/linear", "b", SPLIT, 0, ("n_vocab",), "lm_head.bias"),
)


# The Llama family (llama.py): no mtj v1 layout (its checkpoints are HF folders); kv heads split over mp as q's heads.
_L = "model.layers.{i}."
_D, _KV = ("d_model", "d_model"), ("d_model", "kv_dim")
LLAMA_WEIGHTS: Tuple[Weight, ...] = (
    Weight("embedding", "w", None, None, SPLIT, 0, ("n_vocab", "d_model"), "model.embed_tokens.weight"),
    Weight("layers/block/ln_attn", "scale", None, None, REPLICATED, None, ("d_model",), _L + "input_layernorm.weight"),
    Weight("layers/block/q", "w", None, None, SPLIT, 1, _D, _L + "self_attn.q_proj.weight", True),
    Weight("layers/block/q", "b", None, None, SPLIT, 0, ("d_model",), _L + "self_attn.q_proj.bias", when="qkv_bias"),
    Weight("layers/block/k", "w", None, None, SPLIT, 1, _KV, _L + "self_attn.k_proj.weight", True),
    Weight("layers/block/k", "b", None, None, SPLIT, 0, ("kv_dim",), _L + "self_attn.k_proj.bias", when="qkv_bias"),
    Weight("layers/block/v", "w", None, None, SPLIT, 1, _KV, _L + "self_attn.v_proj.weight", True),
    Weight("layers/block/v", "b", None, None, SPLIT, 0, ("kv_dim",), _L + "self_attn.v_proj.bias", when="qkv_bias"),
    Weight("layers/block/out", "w", None, None, SPLIT, 0, _D, _L + "self_attn.o_proj.weight", True),
    Weight("layers/block/ln_mlp", "scale", None, None, REPLICATED, None, ("d_model",),
           _L + "post_attention_layernorm.weight"),
    Weight("layers/block/gate", "w", None, None, SPLIT, 1, ("d_model", "d_ff"), _L + "mlp.gate_proj.weight", True),
    Weight("layers/block/up", "w", None, None, SPLIT, 1, ("d_model", "d_ff"), _L + "mlp.up_proj.weight", True),
    Weight("layers/block/down", "w", None, None, SPLIT, 0, ("d_ff", "d_model"), _L + "mlp.down_proj.weight", True),
    Weight("projection/ln_f", "scale", None, None, REPLICATED, None, ("d_model",), "model.norm.weight"),
    Weight("projection/lm_head", "w", None, None, SPLIT, 1, ("d_model", "n_vocab"), "lm_head.weight", True,
           when="untied"),
)


def weights_for(cfg: Any) -> Tuple[Weight, ...]:
    """The weights a model of this config has: GPT-J's table or the Llama family's (only those present)."""
    table = LLAMA_WEIGHTS if getattr(cfg, "is_llama", False) else WEIGHTS
    return tuple(w for w in table if w.present(cfg))
