"""Checkpoint steps of Llama-family models (llama, qwen2, mistral): each step folder is an HF folder.

mtj's v1 layout exists for GPT-J only (its leaf order and per-shard cuts are GPT-J's), so a fine-tune of a Llama,
Qwen2 or Mistral model writes its steps in the format those models are shared in: a step folder that
`AutoModelForCausalLM.from_pretrained(step_dir)` loads as it is, plus the optimizer state beside it.

  {dir}/meta.json                     the same meta.json and commit protocol as v1 checkpoints (checkpoint.py)
  {dir}/step_N/config.json            HF config; its "dtype" is the weights' (float32 while training; bfloat16 slim)
  {dir}/step_N/model.safetensors      the params under their HF names (or model-0000i-of-0000n.safetensors + a
                                      model.safetensors.index.json above MAX_FILE_BYTES)
  {dir}/step_N/optimizer.safetensors  Adam's moments as "mu/<HF name>", "nu/<HF name>" (their own dtype), the Adam
                                      and schedule counters and the step (int32 scalars); absent in params-only steps
  {dir}/step_N/tokenizer files        copied from the config's tokenizer folder when it is one

Floats are stored in the dtype they are trained in and read back unchanged, so a resume is bit-exact. Only the
writing and reading of one step folder is here; which step is committed, kept or removed is checkpoint.py's.
A multi-process run (arrays spanning several hosts) cannot write these files yet: each tensor is whole in one file,
so one host would need every leaf whole (docs/DEVIATIONS.md); it is refused with that explanation.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from . import checkpoint as ck
from . import hf
from .config import Config

OPTIMIZER = "optimizer.safetensors"
MAX_FILE_BYTES = 4 << 30  # params above this are split over several files with an index (save_pretrained: 5 GB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")
_SCALARS = ("adam_count", "schedule_count", "step")


def is_hf_step(step_dir: str) -> bool:
    """Whether a step folder holds this format (an HF config.json) rather than v1 shard folders."""
    return ck._exists(ck._join(step_dir, "config.json"))


def _dtype_name(tree: Any) -> str:
    import jax
    leaf = jax.tree.leaves(tree)[0]
    name = np.dtype(leaf.dtype).name
    if name not in hf._NP_DTYPES:
        raise ck.CheckpointError(f"params of dtype {name} cannot be written to safetensors here; use float32 or "
                                 f"bfloat16")
    return name


def _write_safetensors(path: str, tensors: Dict[str, np.ndarray]) -> None:
    if ck._is_gcs(path):
        from safetensors.numpy import save
        with ck._open(path, "wb") as f:
            f.write(save(tensors, metadata={"format": "pt"}))
        return
    from safetensors.numpy import save_file
    save_file(tensors, path, metadata={"format": "pt"})


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """A safetensors file (local or gs://) as numpy; a missing or damaged one is a CorruptCheckpointError."""
    try:
        if not ck._is_gcs(path):
            return hf._load_safetensors(path)
        from safetensors.numpy import load
        with ck._open(path, "rb") as f:
            return load(f.read())
    except Exception as e:  # ValueError from hf (damaged), SafetensorError, OSError, a missing gs:// object
        raise ck.CorruptCheckpointError(f"cannot read {path}: {ck._why(e)}; the file is damaged (truncated or "
                                        f"overwritten) or missing") from e


def _write_json(path: str, value: dict) -> None:
    with ck._open(path, "w") as f:
        json.dump(value, f, indent=2)


def _host_tree(tree: Any, dtype=None) -> Any:
    return {m: {n: ck._host(x, dtype) for n, x in leaves.items()} for m, leaves in tree.items()}


def write_step(step_dir: str, cfg: Config, params: Any, opt: Optional[Tuple[Any, Any, Any, Any]], step: int,
               slim: bool, crash: Callable[[], None]) -> None:
    """Every file of one step. opt: (adam count, mu, nu, schedule count) or None (params only); slim: params only,
    in bfloat16. crash(): the test hook of checkpoint.py, called after the params and before the optimizer state."""
    params = _host_tree(params, ml_dtypes.bfloat16 if slim else None)
    dtype = _dtype_name(params)
    size = sum(x.nbytes for leaves in params.values() for x in leaves.values())
    config, files, index = hf.hf_folder(cfg, params, dtype, MAX_FILE_BYTES if size > MAX_FILE_BYTES else None)
    for name, tensors in files:
        _write_safetensors(ck._join(step_dir, name), tensors)
    if index is not None:
        _write_json(ck._join(step_dir, hf.INDEX), index)
    _copy_tokenizer(cfg, step_dir)
    crash()
    if opt is not None:
        adam_count, mu, nu, sched_count = opt
        state = {}
        for tag, tree in (("mu", mu), ("nu", nu)):
            tree = _host_tree(tree)
            for key, arr in hf.to_hf_state_dict(cfg, tree, hf._NP_DTYPES[_dtype_name(tree)]).items():
                state[f"{tag}/{key}"] = arr
        for name, value in zip(_SCALARS, (adam_count, sched_count, step)):
            state[name] = np.asarray(ck._host(value), np.int32).reshape(())
        _write_safetensors(ck._join(step_dir, OPTIMIZER), state)
    _write_json(ck._join(step_dir, "config.json"), config)  # last: a folder without it is not a step of this format


def _copy_tokenizer(cfg: Config, step_dir: str) -> None:
    """The tokenizer's files beside the weights, so the step folder is a complete HF model folder."""
    src = cfg.tokenizer
    if not src or not os.path.isdir(src):
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            if ck._is_gcs(step_dir):
                with open(path, "rb") as f, ck._open(ck._join(step_dir, name), "wb") as out:
                    out.write(f.read())
            else:
                shutil.copyfile(path, os.path.join(step_dir, name))


def read_step(step_dir: str, cfg: Config, with_opt: bool) -> Tuple[Any, Optional[Tuple[Any, Any, Any, Any]], int]:
    """(params, (adam count, mu, nu, schedule count) or None, step stored in the files or -1) of one step folder,
    as host numpy in our layout and in the files' dtypes. A step of another model is named with the key to fix."""
    config_path = ck._join(step_dir, "config.json")
    with ck._open(config_path, "r") as f:
        try:
            saved = json.load(f)
        except ValueError as e:
            raise ck.CorruptCheckpointError(f"{config_path} is damaged ({e})") from None
    _check_config(saved, cfg, config_path)
    single = ck._join(step_dir, hf.SINGLE)
    if ck._exists(single):
        state = _read_safetensors(single)
    else:
        index_path = ck._join(step_dir, hf.INDEX)
        if not ck._exists(index_path):
            raise ck.CorruptCheckpointError(f"{step_dir} has a config.json but neither {hf.SINGLE} nor {hf.INDEX}")
        with ck._open(index_path, "r") as f:
            index = json.load(f)
        state = {}
        for name in hf.index_files(index, index_path):
            state.update(_read_safetensors(ck._join(step_dir, name)))
    params = _from_hf(cfg, state, step_dir)
    opt, step = None, -1
    opt_path = ck._join(step_dir, OPTIMIZER)
    if ck._exists(opt_path) and with_opt:
        tensors = _read_safetensors(opt_path)
        mu = _from_hf(cfg, {k[3:]: v for k, v in tensors.items() if k.startswith("mu/")}, opt_path)
        nu = _from_hf(cfg, {k[3:]: v for k, v in tensors.items() if k.startswith("nu/")}, opt_path)
        adam_count, sched_count, step = (tensors[name] for name in _SCALARS)
        opt, step = (adam_count, mu, nu, sched_count), int(step)
    return params, opt, step


def has_optimizer(step_dir: str) -> bool:
    return ck._exists(ck._join(step_dir, OPTIMIZER))


def _from_hf(cfg: Config, state: Dict[str, np.ndarray], where: str) -> Any:
    """hf.from_hf_state_dict keeping the files' dtypes (it reads float32; bf16 files come back as bf16)."""
    try:
        params = hf.from_hf_state_dict(cfg, state)
    except ValueError as e:
        raise ck.CheckpointError(f"{where}: {e}") from None
    dtype = next(iter(state.values())).dtype if state else np.float32
    if dtype != np.float32:
        params = {m: {n: x.astype(dtype) for n, x in leaves.items()} for m, leaves in params.items()}
    return params


_SHAPE_KEYS = (("model_type", "model_type"), ("num_hidden_layers", "layers"), ("hidden_size", "d_model"),
               ("num_attention_heads", "n_heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "n_vocab"),
               ("intermediate_size", "ffn_dim"))


def _check_config(saved: dict, cfg: Config, where: str) -> None:
    for hf_key, ours in _SHAPE_KEYS:
        if hf_key in saved and saved[hf_key] != getattr(cfg, ours):
            raise ck.CheckpointError(f"{where} is a checkpoint of a model with {hf_key}={saved[hf_key]}, but the "
                                     f"config gives {ours}={getattr(cfg, ours)}; load it with the config it was "
                                     f"trained with")
