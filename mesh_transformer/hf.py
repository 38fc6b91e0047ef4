"""Import and export of HF `transformers` GPT-J folders (`config.json` + safetensors), so released weights can be
fine-tuned here and our checkpoints load in `GPTJForCausalLM.from_pretrained`.

Mapping (DESIGN section 5): Haiku Linear weights are (in, out), torch's are (out, in), so every matrix is
transposed; HF has no embedding bias, so it is folded into `wte` (`wte = W + b`) on export and is zero on import.
Reading and writing safetensors needs no torch; a legacy `pytorch_model.bin` is read with
`torch.load(weights_only=True)` only (never unpickling arbitrary objects).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import ml_dtypes
import numpy as np

from .config import LLAMA_FAMILY, Config, ConfigError, from_dict
from .weights import WEIGHTS, dim_value, weights_for

_BY_PATH = {(w.module, w.name): w for w in WEIGHTS}  # the one weight table (weights.py) holds every HF name


def _hf_key(module: str, name: str) -> str:
    return _BY_PATH[(module, name)].hf_name


def hf_config_dict(cfg: Config, eos_token_id: int = 50256) -> dict:
    """The `config.json` of a GPTJForCausalLM with our model's shapes."""
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "vocab_size": cfg.n_vocab,
        "n_positions": cfg.seq,
        "n_embd": cfg.d_model,
        "n_layer": cfg.layers,
        "n_head": cfg.n_heads,
        "rotary_dim": cfg.rotary_dims,
        "n_inner": cfg.ffn_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _rope(hf_cfg: dict) -> tuple:
    """(rope_theta, rope_scaling or None) from an HF config: transformers 5's `rope_parameters`, or the older
    top-level rope_theta / rope_scaling that hub folders still carry."""
    params = dict(hf_cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf_cfg.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else hf_cfg.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), (dict(scaling) if scaling is not None else None)


def config_from_hf_llama(hf_cfg: dict, **overrides: Any) -> Config:
    """Our Config from the config.json of a LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM."""
    mt = hf_cfg.get("model_type")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in hf_cfg]
    if missing:
        raise ConfigError(f"HF config.json (model_type {mt!r}) lacks {', '.join(missing)}")
    d, h = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    if hf_cfg.get("head_dim") not in (None, d // h) or d % h:
        raise ConfigError(f"HF config.json head_dim {hf_cfg.get('head_dim')} is not hidden_size/num_attention_heads "
                          f"({d}/{h}); models with a separate head_dim are not supported")
    if hf_cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config.json hidden_act {hf_cfg['hidden_act']!r}: the Llama block uses silu")
    if mt == "llama" and (hf_cfg.get("attention_bias") or hf_cfg.get("mlp_bias")):
        raise ConfigError("HF config.json sets attention_bias or mlp_bias: Llama models with biases are not supported")
    if mt == "qwen2" and hf_cfg.get("use_sliding_window"):
        raise ConfigError("HF config.json sets use_sliding_window: Qwen2's per-layer sliding window is not supported")
    theta, scaling = _rope(hf_cfg)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ConfigError(f"HF config.json rope scaling {scaling!r}: only Llama-3's (rope_type llama3) is supported")
    raw = dict(model_type=mt, layers=hf_cfg["num_hidden_layers"], d_model=d, n_heads=h,
               n_kv_heads=hf_cfg.get("num_key_value_heads") or h, n_vocab=hf_cfg["vocab_size"],
               seq=hf_cfg.get("max_position_embeddings", 2048), d_ff=hf_cfg["intermediate_size"],
               rms_norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
               qkv_bias=mt == "qwen2", tie_word_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)),
               sliding_window=hf_cfg.get("sliding_window") if mt == "mistral" else None)
    raw.update(overrides)
    return from_dict(raw, source="HF config.json")


def hf_config_dict_llama(cfg: Config, eos_token_id: Optional[int] = None, bos_token_id: Optional[int] = None) -> dict:
    """The config.json of the HF class of our Llama-family config."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    out = {"architectures": [_ARCH[cfg.model_type]], "model_type": cfg.model_type, "vocab_size": cfg.n_vocab,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head,
           "max_position_embeddings": cfg.seq, "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
           "rope_parameters": rope, "tie_word_embeddings": cfg.tie_word_embeddings, "attention_dropout": 0.0,
           "initializer_range": 0.02, "use_cache": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if cfg.model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def config_from_hf(hf_cfg: dict, **overrides: Any) -> Config:
    """Our Config from an HF GPT-J config.json dict (training keys take their defaults unless overridden)."""
    if hf_cfg.get("model_type", "gptj") != "gptj":
        raise ConfigError(f"HF config has model_type {hf_cfg.get('model_type')!r}; only 'gptj' folders can be loaded")
    if hf_cfg.get("activation_function", "gelu_new") != "gelu_new":
        raise ConfigError(f"HF config activation_function {hf_cfg['activation_function']!r} is not GPT-J's gelu_new")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hf_cfg]
    if missing:
        raise ConfigError(f"HF config.json lacks {', '.join(missing)}; is this the config.json of a GPT-J model?")
    d_model = hf_cfg["n_embd"]
    raw = dict(layers=hf_cfg["n_layer"], d_model=d_model, n_heads=hf_cfg["n_head"], n_vocab=hf_cfg["vocab_size"],
               seq=hf_cfg.get("n_positions", 2048), pe_rotary_dims=hf_cfg.get("rotary_dim"),
               d_ff=hf_cfg.get("n_inner") or 4 * d_model)
    raw.update(overrides)
    return from_dict(raw, source="HF config.json")


def to_hf_state_dict(cfg: Config, params: Any, dtype=np.float32) -> Dict[str, np.ndarray]:
    """Our params -> HF state dict of numpy arrays (torch layout), for either family (weights.weights_for)."""
    p = {mod: {name: np.asarray(leaf, np.float32) for name, leaf in leaves.items()} for mod, leaves in params.items()}
    out = {}
    if not cfg.is_llama:
        out[_hf_key("embedding", "w")] = p["embedding"]["w"] + p["embedding"]["b"][None, :]  # HF folds the bias in
    for w in weights_for(cfg):
        if w.hf_name is None or w.hf_name in out:
            continue
        if w.stacked:
            for i in range(cfg.layers):
                leaf = p[w.module][w.name][i]
                out[w.hf_name.format(i=i)] = leaf.T if w.hf_transpose else leaf
        else:
            leaf = p[w.module][w.name]
            out[w.hf_name] = leaf.T if w.hf_transpose else leaf
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in out.items()}


def from_hf_state_dict(cfg: Config, state: Dict[str, np.ndarray]) -> Any:
    """HF state dict (numpy) -> our params (float32 numpy), for either family."""
    if not cfg.is_llama:  # GPT-J folders name keys without the "model." some exporters add
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    arch = _ARCH.get(cfg.model_type, "GPTJForCausalLM")

    def get(key: str, shape: tuple) -> np.ndarray:
        if key not in state:
            raise ValueError(f"HF weights lack '{key}'; is this a {arch} checkpoint (config.json model_type "
                             f"{cfg.model_type!r})?")
        arr = np.asarray(state[key], np.float32)
        if arr.shape != tuple(shape):
            raise ValueError(f"HF weight '{key}' has shape {arr.shape}, the config needs {tuple(shape)}; "
                             f"check config.json (hidden size, heads, kv heads, intermediate size, vocab, layers)")
        return arr

    params: dict = {} if cfg.is_llama else {"embedding": {"b": np.zeros((cfg.d_model,), np.float32)}}
    for w in weights_for(cfg):
        if w.hf_name is None:
            continue
        shape = tuple(dim_value(cfg, k) for k in w.dims)  # ours, unstacked
        torch_shape = shape[::-1] if w.hf_transpose else shape
        keys = [w.hf_name.format(i=i) for i in range(cfg.layers)] if w.stacked else [w.hf_name]
        leaves = [get(key, torch_shape) for key in keys]
        leaves = [x.T.copy() if w.hf_transpose else x for x in leaves]
        params.setdefault(w.module, {})[w.name] = np.stack(leaves) if w.stacked else leaves[0]
    return params


SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def index_files(index: dict, where: str) -> list:
    """The safetensors file names a model.safetensors.index.json names (`where`: its path, for the error)."""
    try:
        return sorted(set(index["weight_map"].values()))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where} is damaged ({type(e).__name__}: {e}); it must be JSON with a \"weight_map\" "
                         f"object: save the model again") from None


def _read_state_dict(hf_dir: str) -> Dict[str, np.ndarray]:
    single = os.path.join(hf_dir, SINGLE)
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(single):
        return _load_safetensors(single)
    if os.path.exists(index):
        try:
            with open(index) as f:
                raw = json.load(f)
        except ValueError as e:
            raise ValueError(f"{index} is damaged ({type(e).__name__}: {e}); it must be JSON with a \"weight_map\" "
                             f"object: save the model again") from None
        files = index_files(raw, index)
        state = {}
        for name in files:
            state.update(_load_safetensors(os.path.join(hf_dir, name)))
        return state
    legacy = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(legacy):
        import torch  # only for the legacy pickle format, and only with weights_only=True
        import pickle
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
            # never torch's advice to retry with weights_only=False: that unpickling would run the file's code
            raise ValueError(f"{legacy} was refused: it is not a plain tensor file ({type(e).__name__}; it holds "
                             f"Python objects that could run code when unpickled, or it is damaged). Do not load it "
                             f"unsafely; get the weights as model.safetensors from a source you trust") from None
        if not isinstance(tensors, dict) or not all(hasattr(t, "numpy") for t in tensors.values()):
            raise ValueError(f"{legacy} holds {type(tensors).__name__}, not a state dict of tensors; pass the folder "
                             f"of an HF GPT-J checkpoint")
        return {k: t.float().numpy() for k, t in tensors.items()}
    raise FileNotFoundError(f"{hf_dir} holds no model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model.bin; pass the folder an HF GPT-J was saved to")


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Loads a safetensors file to numpy, reading bf16 through ml_dtypes (numpy has no bf16)."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except Exception as e:  # SafetensorError (truncated / not safetensors), OSError
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall") and \
                not isinstance(e, (OSError, ValueError)):
            raise
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]}); the file "
                         f"is damaged or truncated: download or export it again") from None
    return out


def read_hf_config(hf_dir: str, saved_by: str = "GPTJForCausalLM.save_pretrained or save_hf_gptj",
                   error: type = ValueError) -> dict:
    """The folder's config.json as a dict; a missing or malformed one is named with the fix."""
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found; pass a folder saved by {saved_by}")
    with open(cfg_path) as f:
        try:
            raw = json.load(f)
        except ValueError as e:
            raise error(f"{cfg_path} is not valid JSON ({e}); save the model again") from None
    if not isinstance(raw, dict):
        raise error(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def load_hf_gptj(hf_dir: str, **config_overrides: Any):
    """HF GPT-J folder -> (Config, params as float32 numpy)."""
    cfg = config_from_hf(read_hf_config(hf_dir), **config_overrides)
    return cfg, from_hf_state_dict(cfg, _read_state_dict(hf_dir))


def save_hf_gptj(cfg: Config, params: Any, out_dir: str, dtype: str = "float32",
                 eos_token_id: int = 50256) -> None:
    """Writes `config.json` + `model.safetensors` that `GPTJForCausalLM.from_pretrained(out_dir)` loads."""
    from safetensors.numpy import save_file

    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    os.makedirs(out_dir, exist_ok=True)
    state = to_hf_state_dict(cfg, params, np_dtype)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    config = hf_config_dict(cfg, eos_token_id)
    config["torch_dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)



_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def folder_dtype(hf_cfg: dict) -> Optional[str]:
    """The dtype an HF config.json says its weights are in (`dtype`, or the older `torch_dtype`)."""
    value = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    return value if value in _NP_DTYPES else None


def config_from_folder(hf_dir: str, **config_overrides: Any) -> Config:
    """Our Config of an HF folder of any supported family, from its config.json alone (no weights are read).

    The compute dtype follows the folder's dtype (an fp32 folder computes in fp32, a bf16 one in bf16) unless
    `compute_dtype` is overridden; a folder with a tokenizer.json brings its tokenizer (`tokenizer` = the folder)."""
    hf_cfg = read_hf_config(hf_dir, saved_by="save_pretrained or save_hf")
    mt = hf_cfg.get("model_type", "gptj")
    overrides = dict(config_overrides)
    dtype = folder_dtype(hf_cfg)
    if dtype is not None:
        overrides.setdefault("compute_dtype", dtype)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        overrides.setdefault("tokenizer", hf_dir)
    if mt in LLAMA_FAMILY:
        return config_from_hf_llama(hf_cfg, **overrides)
    if mt == "gptj":
        return config_from_hf(hf_cfg, **overrides)
    raise ConfigError(f"{hf_dir}/config.json has model_type {mt!r}; supported: gptj, {', '.join(LLAMA_FAMILY)}")


def load_hf(hf_dir: str, **config_overrides: Any):
    """An HF folder of any supported family (GPTJ/Llama/Qwen2/MistralForCausalLM) -> (Config, float32 numpy params);
    the config as config_from_folder makes it."""
    cfg = config_from_folder(hf_dir, **config_overrides)
    return cfg, from_hf_state_dict(cfg, _read_state_dict(hf_dir))


def hf_folder(cfg: Config, params: Any, dtype: str = "float32", max_shard_bytes: Optional[int] = None,
              eos_token_id: Optional[int] = None, bos_token_id: Optional[int] = None):
    """What an HF folder of these params holds: (config.json dict, [(file name, {HF key: array})], index dict or
    None). One model.safetensors, or with max_shard_bytes the weights split over model-0000i-of-0000n.safetensors
    and a model.safetensors.index.json (as save_pretrained's max_shard_size). Writers: save_hf (a local folder) and
    hf_checkpoint (a checkpoint step, local or gs://)."""
    if not cfg.is_llama:
        eos = 50256 if eos_token_id is None else eos_token_id
        config = hf_config_dict(cfg, eos)
    else:
        config = hf_config_dict_llama(cfg, eos_token_id, bos_token_id)
    config["dtype"] = dtype
    state = to_hf_state_dict(cfg, params, _NP_DTYPES[dtype])
    if max_shard_bytes is None:
        return config, [("model.safetensors", state)], None
    shards, size = [{}], 0
    for key, arr in state.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    files = [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards)]
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
             "weight_map": {key: name for name, shard in files for key in shard}}
    return config, files, index


def save_hf(cfg: Config, params: Any, out_dir: str, dtype: str = "float32", max_shard_bytes: Optional[int] = None,
            eos_token_id: Optional[int] = None, bos_token_id: Optional[int] = None) -> None:
    """Writes an HF folder (`config.json` + safetensors) that `AutoModelForCausalLM.from_pretrained` loads.

    max_shard_bytes: split the weights over several files with an index (hf_folder); None: one model.safetensors.
    Every file is written under a temporary name and renamed, config.json and the index last, so a crash never
    leaves a folder that reads as complete."""
    from safetensors.numpy import save_file

    config, files, index = hf_folder(cfg, params, dtype, max_shard_bytes, eos_token_id, bos_token_id)
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX)
    for stale in (index_path, os.path.join(out_dir, SINGLE)):  # the reader would prefer a stale single file
        if os.path.exists(stale):
            os.remove(stale)
    for name, shard in files:
        tmp = os.path.join(out_dir, name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, name))
    if index is not None:
        _write_json(index_path, index)
    _write_json(os.path.join(out_dir, "config.json"), config)


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)
