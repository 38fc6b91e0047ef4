"""Model and training settings, loaded from mesh-transformer-jax style JSON files.

The original code passed a plain dict around (`configs/6B_roto_256.json`); we keep the same keys and values so the
original files load unchanged, and wrap them in a frozen dataclass that is validated once, up front, with errors that
name the key and say what to change. Keys this project adds (attention implementation, remat, dtypes, loss mask,
tokenizer) are optional and default to the original behaviour.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A config file or dict that cannot describe a model; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Config:
    # --- model shape (mtj keys) ---
    layers: int
    d_model: int
    n_heads: int
    n_vocab: int
    seq: int
    norm: str = "layernorm"
    pe: str = "rotary"
    pe_rotary_dims: Optional[int] = None  # None: rotate the whole head, as mtj's default
    # --- parallelism and batch (mtj keys) ---
    cores_per_replica: int = 1  # size of the 'mp' mesh axis
    per_replica_batch: int = 1  # sequences per data-parallel replica per micro-batch
    gradient_accumulation_steps: int = 1
    tpu_size: int = 8
    # --- optimizer and schedule (mtj keys) ---
    warmup_steps: int = 0
    anneal_steps: int = 1
    lr: float = 1e-4
    end_lr: float = 1e-5
    weight_decay: float = 0.0
    total_steps: int = 0
    # --- data, checkpoints, logging (mtj keys) ---
    bucket: Optional[str] = None
    model_dir: Optional[str] = None
    train_set: Optional[str] = None
    val_set: Mapping[str, str] = dataclasses.field(default_factory=dict)
    eval_harness_tasks: tuple = ()
    val_batches: int = 0
    val_every: int = 0
    ckpt_every: int = 0
    keep_every: int = 0
    name: str = "model"
    wandb_project: Optional[str] = None
    comment: str = ""
    early_cast: bool = False  # mtj: cast params to bf16 up front (bf16 master weights)
    noise_scale_alpha: Optional[float] = None
    # --- STaR keys (ezelikman/STaR configs) ---
    p_rationalization: Optional[float] = None
    target_save: Optional[str] = None
    target_save_folder: Optional[str] = None
    # --- our additions; defaults reproduce the original ---
    d_ff: Optional[int] = None  # None: 4 * d_model, as GPT-J
    compute_dtype: str = "bfloat16"  # dtype of matmuls; params stay float32 unless early_cast
    # attention without a KV cache (training, full forward): "xla" the whole causal square; "blocked" query blocks
    # over the keys on and below the diagonal (attention.py); "cudnn" NVIDIA GPUs; "auto" (default) blocked on CPU,
    # where it measured 1.26-1.29x the xla training step at the demo's shape (BENCHMARKS.md "Training"), xla elsewhere.
    # Same results to fp32 rounding either way; cached decoding always runs the xla core.
    attention_impl: str = "auto"
    attention_block_size: int = 64  # query rows per block of attention_impl "blocked" (and "auto" on CPU)
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
    scan_layers: bool = False  # lax.scan over layers (faster compiles for deep models)
    loss_mask: str = "completion"  # "completion": honour the records' loss_mask feature; "none": every token
    tokenizer: str = "gpt2"  # "byte" (built in), "gpt2" (looked up locally), a folder, or a hub id
    keep_n: Optional[int] = None  # keep this many recent checkpoints besides every keep_every-th
    z_loss: float = 1e-4  # mtj's z-loss coefficient during training
    adam_dtype: str = "params"  # dtype of Adam's first moment: the params' (mtj) or "bfloat16" (half the bytes)
    zero: bool = False  # ZeRO: fp32 master params and optimizer state sharded over 'dp' too, gathered for the forward
    # --- model family (issue 18); the Llama keys are ignored by "gptj" ---
    model_type: str = "gptj"  # "gptj" | "llama" | "qwen2" | "mistral" (the last three: the Llama block, llama.py)
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None: n_heads
    rope_theta: float = 10000.0  # rotary base (Llama family)
    rope_scaling: Optional[Mapping[str, Any]] = None  # Llama-3's {"rope_type": "llama3", "factor", ...}; None: off
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon (Llama family)
    qkv_bias: bool = False  # q/k/v projections with bias (Qwen2)
    tie_word_embeddings: bool = False  # lm_head is the embedding's transpose (Qwen2-0.5B, Llama-3.2-1B)
    sliding_window: Optional[int] = None  # attend to the last `sliding_window` positions only (Mistral)

    # ----- derived -----
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention); n_heads unless the config sets n_kv_heads."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def rotary_dims(self) -> int:
        return self.pe_rotary_dims if self.pe_rotary_dims is not None else self.d_head

    @property
    def is_llama(self) -> bool:
        """The Llama block (llama.py) rather than GPT-J's (layers.py)."""
        return self.model_type in LLAMA_FAMILY

    @property
    def n_params(self) -> int:
        """Parameter count (embedding bias and LN included), for MFU and logs."""
        d, f, v, L = self.d_model, self.ffn_dim, self.n_vocab, self.layers
        if self.is_llama:
            kv = self.kv_heads * self.d_head
            per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d + ((d + 2 * kv) if self.qkv_bias else 0)
            return L * per_layer + v * d + d + (0 if self.tie_word_embeddings else d * v)
        per_layer = 4 * d * d + 2 * d * f + f + d + 2 * d
        return L * per_layer + v * d + d + 2 * d + d * v + v

    def replace(self, **changes: Any) -> "Config":
        return from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


class _Frozen(dict):
    """A dict that hashes (Config is a frozen dataclass used as a static jit argument)."""

    def __hash__(self):
        return hash(json.dumps(self, sort_keys=True))


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
REQUIRED_KEYS = tuple(name for name, f in _FIELDS.items()
                      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
LLAMA_FAMILY = ("llama", "qwen2", "mistral")
_CHOICES = {
    "model_type": ("gptj",) + LLAMA_FAMILY,
    "norm": ("layernorm",),
    "pe": ("rotary",),
    "compute_dtype": ("bfloat16", "float32", "float16"),
    "attention_impl": ("xla", "blocked", "cudnn", "auto"),
    "remat": ("none", "full", "dots"),
    "loss_mask": ("completion", "none"),
    "adam_dtype": ("params", "bfloat16"),
}


def _where(source: Optional[str]) -> str:
    return f" in {source}" if source else ""


def from_dict(raw: Mapping[str, Any], source: Optional[str] = None) -> Config:
    """Builds and validates a Config; `source` (a file name) goes into error messages."""
    unknown = [k for k in raw if k not in _FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(_FIELDS))}"
        raise ConfigError(f"config key '{key}' unknown{_where(source)}{hint}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ConfigError(f"config{_where(source)} is missing required key(s) {missing}: add them "
                          f"(see configs/6B_roto_256.json for a complete example)")
    values = dict(raw)
    if isinstance(values.get("rope_scaling"), Mapping):
        values["rope_scaling"] = _Frozen(values["rope_scaling"])
    if "eval_harness_tasks" in values:
        values["eval_harness_tasks"] = tuple(values["eval_harness_tasks"] or ())
    if values.get("val_set") is None:
        values["val_set"] = {}
    cfg = Config(**values)
    _validate(cfg, source)
    return cfg


# Types and ranges of every scalar key (checked before anything else, so a string or NaN never reaches arithmetic):
# (kind, minimum or None, allow None)
_INT, _FLOAT, _BOOL, _STR = "integer", "number", "boolean (true/false)", "string"
_TYPES = {
    "warmup_steps": (_INT, 0, False), "anneal_steps": (_INT, 1, False), "total_steps": (_INT, 0, False),
    "tpu_size": (_INT, 1, False), "val_batches": (_INT, 0, False), "val_every": (_INT, 0, False),
    "ckpt_every": (_INT, 0, False), "keep_every": (_INT, 0, False), "keep_n": (_INT, 0, True),
    "d_ff": (_INT, 1, True), "attention_block_size": (_INT, 1, False), "n_kv_heads": (_INT, 1, True), "sliding_window": (_INT, 1, True),
    "rope_theta": (_FLOAT, 0, False), "rms_norm_eps": (_FLOAT, 0, False), "qkv_bias": (_BOOL, None, False),
    "tie_word_embeddings": (_BOOL, None, False), "pe_rotary_dims": (_INT, None, True),
    "lr": (_FLOAT, 0, False), "end_lr": (_FLOAT, 0, False), "weight_decay": (_FLOAT, 0, False),
    "z_loss": (_FLOAT, 0, False), "noise_scale_alpha": (_FLOAT, None, True), "p_rationalization": (_FLOAT, 0, True),
    "early_cast": (_BOOL, None, False), "scan_layers": (_BOOL, None, False), "zero": (_BOOL, None, False),
    "name": (_STR, None, False), "comment": (_STR, None, True), "tokenizer": (_STR, None, False),
    "bucket": (_STR, None, True), "model_dir": (_STR, None, True), "train_set": (_STR, None, True),
    "wandb_project": (_STR, None, True), "target_save": (_STR, None, True), "target_save_folder": (_STR, None, True),
}
_MAXIMUM = {"p_rationalization": 1.0}


def _check_types(cfg: "Config", fail) -> None:
    import math
    for key, (kind, minimum, nullable) in _TYPES.items():
        value = getattr(cfg, key)
        if value is None and nullable:
            continue
        if kind == _INT:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == _FLOAT:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind == _BOOL:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            extra = " (a finite number: NaN and Infinity are not allowed)" if kind == _FLOAT else ""
            fail(f"'{key}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}{extra}, got {value!r} ({type(value).__name__}); write e.g. "
                 f"\"{key}\": {_example(key, kind)}")
        if minimum is not None and value < minimum:
            fail(f"'{key}' must be >= {minimum}, got {value!r}")
        if key in _MAXIMUM and value > _MAXIMUM[key]:
            fail(f"'{key}' must be <= {_MAXIMUM[key]}, got {value!r}")


def _example(key: str, kind: str) -> str:
    default = _FIELDS[key].default
    if default is None or default is dataclasses.MISSING:
        return {"integer": "1", "number": "0.5", "string": '"..."'}.get(kind, "true")
    return json.dumps(default)


def _validate(cfg: Config, source: Optional[str]) -> None:
    where = _where(source)

    def fail(msg: str) -> None:
        raise ConfigError(f"config{where}: {msg}")


    for key in ("layers", "d_model", "n_heads", "n_vocab", "seq", "cores_per_replica", "per_replica_batch",
                "gradient_accumulation_steps"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"'{key}' must be a positive integer, got {value!r}")
    _check_types(cfg, fail)
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            fail(f"'{key}' is {getattr(cfg, key)!r}; supported values: {', '.join(choices)}")
    if cfg.d_model % cfg.n_heads:
        fail(f"n_heads={cfg.n_heads} does not divide d_model={cfg.d_model}; pick n_heads so that d_model/n_heads "
             f"is whole (GPT-J-6B: d_model 4096, n_heads 16)")
    _validate_family(cfg, fail)
    if cfg.n_heads % cfg.cores_per_replica:
        fail(f"cores_per_replica={cfg.cores_per_replica} does not divide n_heads={cfg.n_heads}; heads are split "
             f"over the model-parallel axis, so set cores_per_replica to a divisor of n_heads")
    if cfg.n_vocab % cfg.cores_per_replica:
        fail(f"cores_per_replica={cfg.cores_per_replica} does not divide n_vocab={cfg.n_vocab}; pad n_vocab up to "
             f"a multiple (GPT-J pads GPT-2's 50257 to 50400)")
    if cfg.d_ff is not None and (cfg.d_ff < 1 or cfg.d_ff % cfg.cores_per_replica):
        fail(f"d_ff={cfg.d_ff} must be positive and divisible by cores_per_replica={cfg.cores_per_replica}")
    rot = cfg.rotary_dims
    if not isinstance(rot, int) or rot < 0 or rot > cfg.d_head or rot % 2:
        fail(f"pe_rotary_dims={cfg.pe_rotary_dims} must be an even number between 0 and d_head="
             f"{cfg.d_head} (d_model/n_heads); GPT-J-6B uses 64")
    if cfg.lr < 0 or cfg.end_lr < 0 or cfg.weight_decay < 0:
        fail("lr, end_lr and weight_decay must not be negative")
    if cfg.warmup_steps < 0 or cfg.anneal_steps < 1:
        fail(f"warmup_steps must be >= 0 and anneal_steps >= 1 (got {cfg.warmup_steps}, {cfg.anneal_steps})")
    if not isinstance(cfg.val_set, Mapping):
        fail(f"'val_set' must be an object {{name: index file}}, got {type(cfg.val_set).__name__}")


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _validate_family(cfg: Config, fail) -> None:
    """The keys a model family needs, and those it cannot honour."""
    if not cfg.is_llama:
        for key, default in (("n_kv_heads", None), ("rope_scaling", None), ("qkv_bias", False),
                             ("tie_word_embeddings", False), ("sliding_window", None)):
            if getattr(cfg, key) not in (default, cfg.n_heads if key == "n_kv_heads" else default):
                fail(f"'{key}' is set but model_type is {cfg.model_type!r}: GPT-J has no such option; set "
                     f"\"model_type\" to one of {', '.join(LLAMA_FAMILY)} or remove '{key}'")
        return
    if cfg.kv_heads < 1 or cfg.n_heads % cfg.kv_heads:
        fail(f"n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads} (grouped-query attention: each kv head "
             f"serves n_heads/n_kv_heads query heads)")
    if cfg.rotary_dims != cfg.d_head:
        fail(f"pe_rotary_dims={cfg.pe_rotary_dims}: the Llama family rotates the whole head (d_head={cfg.d_head}); "
             f"remove pe_rotary_dims")
    rs = cfg.rope_scaling
    if rs is not None:
        if not isinstance(rs, Mapping) or rs.get("rope_type", rs.get("type")) not in ("llama3", "default"):
            fail(f"'rope_scaling' is {rs!r}; supported: null or {{\"rope_type\": \"llama3\", "
                 f"{', '.join(_LLAMA3_KEYS)}}} (Llama-3.1/3.2)")
        missing = [k for k in _LLAMA3_KEYS if rs.get("rope_type", rs.get("type")) == "llama3" and k not in rs]
        if missing:
            fail(f"'rope_scaling' of type llama3 lacks {', '.join(missing)}; copy them from the model's config.json")


def read_raw_config(path: str, what: str = "config file") -> tuple:
    """(raw key dict, source name) of a JSON config file or a preset name, before validation."""
    path = str(path)
    if path in PRESETS:
        return dict(PRESETS[path]), f"preset '{path}'"
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} not found; pass a JSON file (e.g. configs/6B_roto_256.json) or a "
                          f"preset name ({', '.join(PRESETS)})")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} {path} must hold a JSON object, got {type(raw).__name__}")
    return dict(raw), path


def load_config(path_or_dict: Any) -> Config:
    """Loads a JSON config file (or a preset name, or a dict) into a validated Config."""
    if isinstance(path_or_dict, Config):
        return path_or_dict
    if isinstance(path_or_dict, Mapping):
        return from_dict(path_or_dict)
    raw, source = read_raw_config(path_or_dict)
    return from_dict(raw, source=source)


# Named presets: the released model and tiny shapes for tests and demos.
PRESETS = {
    "gptj-6b": dict(layers=28, d_model=4096, n_heads=16, n_vocab=50400, seq=2048, pe_rotary_dims=64,
                    cores_per_replica=8, gradient_accumulation_steps=16, warmup_steps=3000, anneal_steps=300000,
                    lr=1.2e-4, end_lr=1.2e-5, weight_decay=0.1, total_steps=350000),
    "tiny": dict(layers=2, d_model=64, n_heads=4, n_vocab=512, seq=64, pe_rotary_dims=8, compute_dtype="float32",
                 tokenizer="byte", warmup_steps=10, anneal_steps=200, lr=3e-3, end_lr=3e-4),
}
