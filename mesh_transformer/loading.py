"""Loading a model for inference, shared by the CLIs that sample, evaluate or serve (`device_sample.py`,
`eval_harness.py`, `device_serve.py`): the same flags, the same order of sources, the same errors.

Sources, first that applies: --hf (a Hugging Face GPT-J folder), --ckpt (a v1 checkpoint folder), the config's
checkpoint folder (bucket/model_dir, latest step); with none of these, a randomly initialised model and a warning
(enough to try a tool on a tiny config).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple, Optional

# the model's keys, which an --hf folder's config.json decides ("seq" is not one: it is the training / sampling length,
# which a --config may set below the folder's max_position_embeddings)
SHAPE_KEYS = ("layers", "d_model", "n_heads", "n_vocab", "pe_rotary_dims", "d_ff",
              # the model family's keys also come from the folder's config.json
              "model_type", "n_kv_heads", "rope_theta", "rope_scaling", "rms_norm_eps", "qkv_bias",
              "tie_word_embeddings", "sliding_window")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--config, --ckpt, --ckpt-step, --hf, --tokenizer, --cores-per-replica, --compute-dtype."""
    a = p.add_argument
    a("--config", default=None, help="model config: a JSON file in mesh-transformer-jax's format or a preset name "
                                     "(gptj-6b, tiny); required unless --hf is given")
    a("--ckpt", default=None, help="v1 checkpoint folder (holding meta.json, or a step_N folder) to load; default: "
                                   "the config's bucket/model_dir, or a random init when that holds no checkpoint")
    a("--ckpt-step", type=int, default=None, help="checkpoint step to load (default: the latest)")
    a("--hf", default=None, help="Hugging Face folder (config.json + safetensors) of a GPTJ, Llama, Qwen2 or "
                                 "MistralForCausalLM to load instead of a checkpoint; the compute dtype follows the "
                                 "folder's unless --compute-dtype or the config sets it; --config then only "
                                 "supplies training keys, if given")
    a("--tokenizer", default=None, help="byte, gpt2 or a folder with vocab.json + merges.txt (default: the "
                                        "config's tokenizer, or the --hf folder when it holds one)")
    a("--cores-per-replica", type=int, default=None, help="model-parallel size on this machine (default: the "
                                                          "config's when it divides the device count, else 1)")
    a("--compute-dtype", choices=("float32", "bfloat16"), default=None,
      help="dtype of the matmuls and KV cache (default: the config's, bfloat16; float32 is faster on CPU)")


def hf_config(hf: str, config: Optional[str] = None, **overrides: Any):
    """The Config of an HF folder: the model's keys from its config.json (SHAPE_KEYS), every other key the --config
    file sets (not its defaults: the compute dtype follows the folder's) from that file, then `overrides`."""
    from .config import read_raw_config
    from .hf import config_from_folder

    extra = {}
    if config:
        extra = {k: v for k, v in read_raw_config(config)[0].items() if k not in SHAPE_KEYS}
    return config_from_folder(hf, **{**extra, **overrides})


class Loaded(NamedTuple):
    config: Any  # mesh_transformer.config.Config
    params: Any  # host (numpy) arrays; None: a random init (made on the mesh by the caller, with `seed`)
    tokenizer: Optional[str]  # tokenizer spec implied by the source (the --hf folder), or None
    seed: int = 0


def load_model(config: Optional[str] = None, ckpt: Optional[str] = None, ckpt_step: Optional[int] = None,
               hf: Optional[str] = None, compute_dtype: Optional[str] = None, seed: int = 0,
               what: str = "sampling from") -> Loaded:
    """(config, params, tokenizer spec) from `hf`, `ckpt` or the config's checkpoint folder; params None for a random
    init (the caller creates it in its shardings: `Sampler.init_params`)."""
    from .config import load_config

    overrides = {"compute_dtype": compute_dtype} if compute_dtype else {}
    if hf:
        from .hf import from_hf_state_dict, _read_state_dict

        cfg = hf_config(hf, config, **overrides)
        params = from_hf_state_dict(cfg, _read_state_dict(hf))
        tok = hf if any(os.path.exists(os.path.join(hf, f)) for f in ("vocab.json", "tokenizer.json")) else None
        print(f"loaded HF {cfg.model_type} from {hf} (compute {cfg.compute_dtype})", file=sys.stderr)
        return Loaded(cfg, params, tok)
    if not config:
        raise ValueError("pass --config (a JSON config or preset name), or --hf with a Hugging Face GPT-J folder")
    cfg = load_config(config)
    if overrides:
        cfg = cfg.replace(**overrides)
    from . import checkpoint as ck

    path = ckpt
    if path is None and cfg.model_dir:
        path = ck.checkpoint_dir(cfg)
    if ckpt is not None:  # asked for explicitly: failing to load it is an error
        params, _, step, _ = ck.load_checkpoint(path, cfg, step=ckpt_step, with_opt=False)
        print(f"loaded {path} step {step}", file=sys.stderr)
        return Loaded(cfg, params, None)
    if path is not None:
        try:
            params, _, step, _ = ck.load_checkpoint(path, cfg, step=ckpt_step, with_opt=False)
            print(f"loaded {path} step {step}", file=sys.stderr)
            return Loaded(cfg, params, None)
        except (FileNotFoundError, ValueError) as e:
            why = f"no checkpoint loaded from {path} ({' '.join(str(e).split())})"
    else:
        why = "the config has no model_dir and no --ckpt was given"
    print(f"warning: {why}; {what} a RANDOMLY INITIALISED model", file=sys.stderr)
    return Loaded(cfg, None, None, seed)


def model_parallel_size(cfg: Any, cores_per_replica: Optional[int] = None) -> int:
    """The mp size: --cores-per-replica, else the config's when it divides the device count, else 1."""
    import jax

    n_dev = jax.device_count()
    mp = cores_per_replica or (cfg.cores_per_replica if n_dev % cfg.cores_per_replica == 0 else 1)
    if n_dev % mp or cfg.n_heads % mp:
        raise ValueError(f"--cores-per-replica {mp} must divide the device count ({n_dev}) and n_heads "
                         f"({cfg.n_heads})")
    return mp


def load_tokenizer(spec: Optional[str], cfg: Any):
    """The tokenizer for `spec` (else the config's), checked to fit the model's vocabulary."""
    from .tokenizer import get_tokenizer

    tokenizer = get_tokenizer(spec or cfg.tokenizer)
    if tokenizer.vocab_size > cfg.n_vocab:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.n_vocab}; pass the --tokenizer the model was trained with")
    return tokenizer


def sampler_from_args(args: argparse.Namespace, what: str = "sampling from"):
    """(Sampler on the ('dp','mp') mesh, tokenizer) from the flags of `add_model_flags` (+ args.seed if present)."""
    from .model import CausalTransformer
    from .sampling import Sampler
    from .sharding import make_mesh

    loaded = load_model(args.config, args.ckpt, args.ckpt_step, args.hf, args.compute_dtype,
                        getattr(args, "seed", 0) or 0, what=what)
    cfg = loaded.config
    mp = model_parallel_size(cfg, args.cores_per_replica)
    tokenizer = load_tokenizer(args.tokenizer or loaded.tokenizer, cfg)
    sampler = Sampler(CausalTransformer(cfg), loaded.params, mesh=make_mesh(mp))
    if loaded.params is None:
        sampler.init_params(loaded.seed)
    return sampler, tokenizer
