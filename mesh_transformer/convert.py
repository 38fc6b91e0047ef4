"""Checkpoint conversions behind the CLIs `slim_model.py`, `to_hf_weights.py` and `from_hf_weights.py`.

  slim_checkpoint    full v1 checkpoint (params + Adam state) -> params-only v1 checkpoint in bf16 (or fp16), any
                     shard count (mtj's slim_model.py, which wrote to `{model_dir}_slim`)
  checkpoint_to_hf   v1 checkpoint -> HF folder (config.json + model.safetensors) for GPTJForCausalLM (mtj's
                     to_hf_weights.py, which wrote pytorch_model.bin)
  hf_to_checkpoint   HF GPT-J folder -> params-only v1 checkpoint at step 0 + the Config that describes it (new)

Every output is committed whole or not at all: v1 checkpoints through checkpoint.save_checkpoint's meta.json commit,
HF weights through a temporary file renamed into place. Outputs never overwrite an existing checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional, Union

import ml_dtypes
import numpy as np

from . import checkpoint as ckpt
from . import hf
from .config import Config, from_dict, read_raw_config

log = logging.getLogger(__name__)

GPT2_EOS = 50256
# CLI spellings (mtj's fp16/bf16/fp32) and numpy names -> numpy dtype names
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Config keys set by an HF config.json (the model's shape); every other key may come from a base config
HF_SHAPE_KEYS = ("layers", "d_model", "n_heads", "n_vocab", "pe_rotary_dims", "d_ff")


class ConvertError(ValueError):
    """An input that cannot be converted, or an output that would overwrite something; the message says what to do."""


def dtype_name(dtype: str) -> str:
    """'fp16' / 'float16' -> 'float16' (also bf16, fp32)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConvertError(f"dtype {dtype!r} unknown; use one of fp32, fp16, bf16") from None


def cast_params(params: Any, dtype: str) -> Any:
    """Host numpy params with every leaf cast to dtype ('fp32', 'bf16', ...)."""
    np_dtype = _NP_DTYPES[dtype_name(dtype)]
    return {mod: {name: np.asarray(leaf).astype(np_dtype) for name, leaf in leaves.items()}
            for mod, leaves in params.items()}


def _require_no_checkpoint(path: str) -> None:
    step = ckpt.latest_step(path)
    if step is not None:
        raise ConvertError(f"{path} already holds a checkpoint (step {step}); pass a new output folder, or remove "
                           f"this one first")


def slim_checkpoint(in_path: str, out_path: str, cfg: Config, step: Optional[int] = None,
                    shards: Optional[int] = None, dtype: str = "bf16") -> int:
    """Writes the params of `in_path` (step `step`, default the latest) as a params-only checkpoint in `dtype` with
    `shards` shards (default cfg.cores_per_replica) to `out_path`, as the same step. Returns the step."""
    if in_path.rstrip("/") == out_path.rstrip("/"):
        raise ConvertError(f"input and output are the same folder ({in_path}); write the slim copy elsewhere")
    _require_no_checkpoint(out_path)
    params, _, step, _ = ckpt.load_checkpoint(in_path, cfg, step=step, with_opt=False)
    name = dtype_name(dtype)
    if name == "bfloat16":  # mtj's slim format
        ckpt.save_checkpoint(out_path, params, step, cfg, shards=shards, slim=True, keep_n=None, keep_every=None)
    else:
        ckpt.save_checkpoint(out_path, cast_params(params, name), step, cfg, shards=shards, keep_n=None,
                             keep_every=None)
    log.info("wrote %s step %d (params only, %s, %d shards)", out_path, step, name, shards or cfg.cores_per_replica)
    return step


def tokenizer_eos(cfg: Config) -> int:
    """EOS id of the config's tokenizer (256 for "byte"); GPT-2's 50256 when the tokenizer cannot be loaded."""
    from .tokenizer import TokenizerError, get_tokenizer
    try:
        return int(get_tokenizer(cfg.tokenizer).eos_token_id)
    except (TokenizerError, OSError) as e:
        log.warning("tokenizer %r not loaded (%s); using GPT-2's EOS id %d in config.json", cfg.tokenizer,
                    " ".join(str(e).split())[:200], GPT2_EOS)
        return GPT2_EOS


def checkpoint_to_hf(in_path: str, cfg: Config, out_dir: str, dtype: str = "fp16", step: Optional[int] = None,
                     eos_token_id: Optional[int] = None) -> int:
    """Writes the params of a v1 checkpoint (a folder with meta.json, or a step_N folder) as an HF GPT-J folder that
    `GPTJForCausalLM.from_pretrained(out_dir)` loads (a Llama-family config: its checkpoint as that family's HF
    folder). Returns the step converted."""
    if "://" in out_dir:
        raise ConvertError(f"--output-path {out_dir}: HF folders are written to a local path; write locally and "
                           f"copy it (e.g. gsutil -m cp -r)")
    params, _, step, _ = ckpt.load_checkpoint(in_path, cfg, step=step, with_opt=False)
    eos = tokenizer_eos(cfg) if eos_token_id is None else eos_token_id
    if cfg.is_llama:  # its checkpoint steps are HF folders already; this writes one in the dtype asked for
        hf.save_hf(cfg, params, out_dir, dtype=dtype_name(dtype), eos_token_id=eos)
    else:
        hf.save_hf_gptj(cfg, params, out_dir, dtype=dtype_name(dtype), eos_token_id=eos)
    log.info("wrote %s (%s, %s, eos id %d) from step %d", out_dir, hf._ARCH.get(cfg.model_type, "GPTJForCausalLM"),
             dtype_name(dtype), eos, step)
    return step


def _base_dict(base: Union[None, str, Mapping[str, Any]]) -> tuple[dict, Optional[str]]:
    """The raw keys of a base config (a JSON file, a preset name or a dict) and its name for messages; the base
    may hold training keys only (it is validated after the HF shapes are added)."""
    if base is None:
        return {}, None
    if isinstance(base, Config):
        return base.to_dict(), "base config"
    if isinstance(base, Mapping):
        return dict(base), "base config"
    return read_raw_config(base, what="base config")


def config_for_hf(hf_config: Mapping[str, Any], base: Union[None, str, Mapping[str, Any]] = None) -> Config:
    """Our Config for an HF GPT-J config.json: its shapes (layers, d_model, n_heads, n_vocab, pe_rotary_dims, d_ff),
    every other key from `base` (seq too, when the base sets it; else n_positions)."""
    raw, source = _base_dict(base)
    overrides = {k: v for k, v in raw.items() if k not in HF_SHAPE_KEYS}
    shape_cfg = hf.config_from_hf(dict(hf_config))
    differ = [f"{k} {raw[k]} -> {getattr(shape_cfg, k)}" for k in HF_SHAPE_KEYS
              if k in raw and raw[k] != getattr(shape_cfg, k)]
    if differ:
        log.warning("the HF config.json sets the model shape; ignoring %s of %s: %s", "these keys" if len(differ) > 1
                    else "this key", source, ", ".join(differ))
    shape = {k: getattr(shape_cfg, k) for k in HF_SHAPE_KEYS}
    merged = {**overrides, **shape}
    merged.setdefault("seq", shape_cfg.seq)
    where = f"{source} + HF config.json" if source else "HF config.json"
    return from_dict(merged, source=where)


def write_config_json(cfg: Config, path: str) -> None:
    """Writes cfg as an mtj-style JSON config (keys with a null value left out), atomically."""
    if "://" in path:
        raise ConvertError(f"config {path}: configs are read from local files; pass a local --output-config")
    data = {k: v for k, v in cfg.to_dict().items() if v is not None}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def default_config_path(out_ckpt: str) -> str:
    """`{out_ckpt}.json` beside a local checkpoint folder."""
    if "://" in out_ckpt:
        raise ConvertError(f"--output-ckpt {out_ckpt} is a URL: also pass --output-config with a local path for the "
                           f"config JSON")
    return out_ckpt.rstrip("/" + os.sep) + ".json"


def hf_to_checkpoint(hf_dir: str, out_path: str, base: Union[None, str, Mapping[str, Any]] = None,
                     shards: Optional[int] = None, dtype: str = "fp32") -> tuple[Config, Any]:
    """Reads an HF GPT-J folder and writes its params as a params-only v1 checkpoint (step 0) in `dtype` with
    `shards` shards (default: the config's cores_per_replica). Returns (config, params as float32 numpy)."""
    hf_config = hf.read_hf_config(hf_dir, "GPTJForCausalLM.save_pretrained or to_hf_weights.py (an HF GPT-J model)",
                                  ConvertError)
    cfg = config_for_hf(hf_config, base)
    _require_no_checkpoint(out_path)
    try:
        params = hf.from_hf_state_dict(cfg, hf._read_state_dict(hf_dir))
    except KeyError as e:  # a weight is missing: the message is the KeyError's argument
        raise ConvertError(f"{hf_dir}: {e.args[0] if e.args else e}") from None
    except ValueError as e:  # a weight of the wrong shape
        raise ConvertError(f"{hf_dir}: {e}") from None
    name = dtype_name(dtype)
    out = params if name == "float32" else cast_params(params, name)
    ckpt.save_checkpoint(out_path, out, 0, cfg, shards=shards, keep_n=None, keep_every=None)
    log.info("wrote %s step 0 (params only, %s, %d shards)", out_path, name, shards or cfg.cores_per_replica)
    return cfg, params
