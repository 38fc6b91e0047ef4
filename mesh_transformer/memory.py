"""Per-device memory of a set-up, from XLA's own analysis of the real compiled functions; fits or not.

  python -m mesh_transformer.memory --config configs/6B_roto_256.json --mesh 1,8 --devices tpu-v3
  python -m mesh_transformer.memory --config configs/6B_roto_256.json --mesh 1,1 --devices h100-80 \\
      --set early_cast=true adam_dtype=bfloat16 remat=full scan_layers=true --sample-batch 64

The init, the train step (the config's GA, batch and remat) and the sampler (batch, shared prefix, own prompt, new
tokens) are lowered and compiled on abstract shapes (`jax.ShapeDtypeStruct` with the run's shardings): nothing is
allocated, so a 6B set-up is checked on a laptop (with as many fake CPU devices as the mesh needs). The figures are
XLA's `memory_analysis()` of the partitioned programs, per device: arguments (params, optimizer state, batch),
outputs, buffers aliased by donation, and temporaries (activations, gradients, the KV cache the sampler allocates).

Which compiler: `--topology v3:2x2` (a TPU v3-8), `v4:2x2x1`, `v5p:2x2x1`, ... compiles for that TPU without one
(JAX's deviceless AOT, `jax.experimental.topologies`; needs libtpu: `pip install --target DIR "libtpu==0.0.42.*"` and
TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so, kept out of requirements.txt because a libtpu in the environment makes every
`import jax` look for TPUs). Without it the functions are compiled for the local devices; on a CPU that is a poor
stand-in for bf16 set-ups, since XLA's CPU backend computes bf16 matmuls in f32 and so holds f32 copies of bf16
weights and caches (temporaries up to ~2x a TPU's). Keep a margin (`--margin`, default 10%) either way.

device_train.py and iteration_train.py call `check_before_run` (the train step; iteration_train.py also its generation
batch) before they load anything, when the devices' memory is known (accelerators report it; STAR_DEVICE_MEMORY_GB
sets it anywhere), and stop with what does not fit and the knobs to turn. With the CLIs' persistent compilation cache
on, the step compiled for the check is not compiled again when training starts (same program, same cache key).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

GiB = 1024 ** 3
DEVICE_MEMORY_ENV = "STAR_DEVICE_MEMORY_GB"
# memory of one device (one TPU core, one GPU), bytes
DEVICES = {"tpu-v3": 16 * GiB, "tpu-v5p": 95 * GiB, "tpu-v4": 32 * GiB, "tpu-v5e": 16 * GiB, "a100-40": 40 * GiB, "a100-80": 80 * GiB,
           "h100-80": 80 * GiB, "h200": 140 * GiB, "l4": 24 * GiB}
_KINDS = {"TPU v3": "tpu-v3", "TPU v4": "tpu-v4", "TPU v5": "tpu-v5p", "TPU v5 lite": "tpu-v5e"}
KNOBS = ("remat 'full' (activations), scan_layers true, a larger cores_per_replica (mp: params and moments split "
         "further), early_cast true (bf16 params), adam_dtype 'bfloat16' (bf16 first moment), a smaller "
         "per_replica_batch or more gradient_accumulation_steps")


@dataclasses.dataclass
class Usage:
    """Bytes per device of one compiled function."""
    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    detail: dict  # named parts (params, optimizer state, KV cache), bytes per device

    @property
    def peak(self) -> int:
        """Live at once: arguments, temporaries and the outputs that do not reuse a donated argument."""
        return self.arguments + self.temporaries + max(0, self.outputs - self.aliased)


def size(n: float) -> str:
    """Bytes as GiB (MiB below 0.1 GiB)."""
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 1024 ** 2:.1f} MiB"


def per_device_bytes(tree: Any) -> int:
    """Bytes that one device holds of a tree of sharded ShapeDtypeStructs / arrays (the largest device's share)."""
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _usage(name: str, lowered, detail: dict, arguments: int) -> Usage:
    """Compiles `lowered` and reads its memory analysis. A TPU compiler refuses a program whose temporaries do not
    fit its HBM (RESOURCE_EXHAUSTED, "HLO temporaries (16.35G)"): that is a figure too, not a crash."""
    try:
        m = lowered.compile().memory_analysis()
    except Exception as e:  # jax.errors.JaxRuntimeError
        found = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        temps = int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))
        return Usage(name + " [compiler: out of memory]", arguments, arguments, arguments, temps, detail)
    return Usage(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                 int(m.temp_size_in_bytes), detail)


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def training_usage(trainer, with_init: bool = True) -> list[Usage]:
    """The trainer's jitted train step (and init), compiled on abstract shapes (one global batch of the config)."""
    import jax
    cfg = trainer.cfg
    state = _abstract(trainer.abstract_state(), trainer.shardings)
    detail = {"params": per_device_bytes(state.params), "optimizer state": per_device_bytes(state.opt_state)}
    batch = (cfg.gradient_accumulation_steps, cfg.per_replica_batch * trainer.mesh.shape["dp"], cfg.seq + 1)
    step = trainer.lower_train_step(batch)
    state_bytes = detail["params"] + detail["optimizer state"]
    usages = [_usage(f"train step (batch {batch[1]} x GA {batch[0]} x seq {cfg.seq})", step, detail, state_bytes)]
    if with_init:
        init = trainer._init.lower(jax.ShapeDtypeStruct((2,), jax.numpy.uint32))
        usages.insert(0, _usage("init", init, detail, 0))
    return usages


def sampling_usage(sampler, batch: int, prefix: int, prompt: int, new_tokens: int) -> Usage:
    """The sampler's generate function (prefill + decode loop) for `batch` rows of `prompt` own tokens after a
    shared prefix of `prefix` tokens, `new_tokens` new ones each; the KV cache is allocated inside it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from .model import PrefixKV
    from .sampling import DP, MP, bucket_length, sampler_kv_bytes
    cfg, mesh = sampler.config, sampler.mesh
    b = -(-batch // mesh.shape[DP]) * mesh.shape[DP]
    tp = bucket_length(prompt)
    shapes = jax.eval_shape(sampler.model.init, jax.random.PRNGKey(0))
    if sampler.per_layer:  # the sampler's own compute copy (Sampler.set_params)
        shapes = jax.eval_shape(sampler.model.split_layers, shapes)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, sampler.model.compute_dtype, sharding=s),
                          shapes, sampler.param_shardings)
    pre_kv = pre_logits = None
    if prefix:
        dtype = sampler.model.compute_dtype
        if sampler.per_layer:
            kv = (jax.ShapeDtypeStruct((cfg.kv_heads, prefix, cfg.d_head), dtype,
                                       sharding=NamedSharding(mesh, P(MP, None, None))),) * cfg.layers
        else:
            kv = jax.ShapeDtypeStruct((cfg.layers, cfg.kv_heads, prefix, cfg.d_head), dtype,
                                      sharding=NamedSharding(mesh, P(None, MP, None, None)))
        pre_kv = PrefixKV(kv, kv)
        pre_logits = jax.ShapeDtypeStruct((cfg.n_vocab,), jnp.float32, sharding=NamedSharding(mesh, P()))
    rows, rows2d = NamedSharding(mesh, P(DP)), NamedSharding(mesh, P(DP, None))

    def arr(shape, dtype, s):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    lowered = sampler._generate.lower(
        new_tokens, params, pre_kv, pre_logits, arr((b, tp), jnp.int32, rows2d), arr((b,), jnp.int32, rows),
        arr((b, 2), jnp.uint32, rows2d), arr((b,), jnp.float32, rows), arr((b,), jnp.int32, rows),
        arr((b,), jnp.float32, rows), np.int32(0), np.zeros((cfg.n_vocab,), bool),
        np.full((4, 4), -3, np.int32))
    dtype_bytes = jnp.dtype(sampler.model.compute_dtype).itemsize
    kv_total = sampler_kv_bytes(cfg, b, prompt, new_tokens, prefix, dtype_bytes)
    devices = mesh.shape[DP] * mesh.shape[MP]
    kv_split = mesh.shape[MP] if cfg.kv_heads % mesh.shape[MP] == 0 else 1
    detail = {"params": per_device_bytes(params),
              "KV cache": kv_total // (kv_split * mesh.shape[DP]) if devices > 1 else kv_total}
    return _usage(f"sampler (batch {b}, prefix {prefix} + prompt {prompt} (bucket {tp}) + {new_tokens} new)",
                  lowered, detail, detail["params"])


def device_memory(devices: Optional[str] = None) -> Optional[int]:
    """Bytes of one device: a --devices preset, else STAR_DEVICE_MEMORY_GB, else what the device reports (None on
    CPU, which reports nothing)."""
    if devices:
        if devices not in DEVICES:
            raise ValueError(f"--devices {devices!r} is not known; choose one of {', '.join(DEVICES)}")
        return DEVICES[devices]
    if os.environ.get(DEVICE_MEMORY_ENV):
        try:
            return int(float(os.environ[DEVICE_MEMORY_ENV]) * GiB)
        except ValueError:
            raise ValueError(f"{DEVICE_MEMORY_ENV}={os.environ[DEVICE_MEMORY_ENV]!r} is not a number of GiB") from None
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def report(usages: Sequence[Usage], capacity: Optional[int], margin: float = 0.1) -> tuple[str, bool]:
    """A table of the figures (GiB per device) and whether every function fits in capacity * (1 - margin)."""
    def g(n):
        return f"{n / GiB:8.2f}"
    lines = [f"{'function':<72} {'args':>8} {'temps':>8} {'outputs':>8} {'aliased':>8} {'peak':>8}  (GiB per device)"]
    fits = True
    for u in usages:
        lines.append(f"{u.name:<72} {g(u.arguments)} {g(u.temporaries)} {g(u.outputs)} {g(u.aliased)} {g(u.peak)}")
        lines.append("    " + ", ".join(f"{k} {size(v)}" for k, v in u.detail.items()))
        if capacity is not None and u.peak > capacity * (1 - margin):
            fits = False
    if capacity is None:
        lines.append("device memory unknown (CPU): pass --devices or set " + DEVICE_MEMORY_ENV)
    else:
        worst = max(usages, key=lambda u: u.peak)
        verdict = "FITS" if fits else "DOES NOT FIT"
        lines.append(f"{verdict}: largest peak {worst.peak / GiB:.2f} GiB ({worst.name.split(' (')[0]}) of "
                     f"{capacity / GiB:.1f} GiB per device ({margin:.0%} kept free)")
    return "\n".join(lines), fits


def check(usages: Sequence[Usage], capacity: Optional[int], margin: float = 0.1) -> str:
    """Raises a ValueError naming what does not fit and the knobs to turn; returns the report otherwise."""
    text, fits = report(usages, capacity, margin)
    if not fits:
        over = [u for u in usages if u.peak > capacity * (1 - margin)]
        names = "; ".join(f"{u.name} needs {size(u.peak)} per device" for u in over)
        raise ValueError(f"this set-up does not fit the devices' {size(capacity)} ({margin:.0%} kept free): "
                         f"{names}. Turn one of the knobs: {KNOBS}; or check a set-up first with "
                         f"`python -m mesh_transformer.memory --config ...`")
    return text


def check_before_run(trainer=None, sampler=None, sampling: Optional[Callable[[], dict]] = None,
                     log=None) -> Optional[str]:
    """The CLIs' pre-flight check. Nothing is compiled, and `sampling()` (the generation shape: batch, prefix,
    prompt, new_tokens) is not even asked, when the device memory is unknown (plain CPU runs)."""
    capacity = device_memory()
    if capacity is None:
        return None
    # the init's peak (its outputs) is part of the step's arguments: the step alone decides
    usages = training_usage(trainer, with_init=False) if trainer is not None else []
    if sampler is not None and sampling is not None:
        usages.append(sampling_usage(sampler, **sampling()))
    text = check(usages, capacity)
    if log is not None:
        log.info("memory check:\n%s", text)
    return text


# ----------------------------------------------------------------------------------------------------------------
def _parse_set(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected key=value, e.g. remat=full")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh_transformer.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="mtj JSON config or preset (e.g. configs/6B_roto_256.json)")
    p.add_argument("--mesh", default=None, help="dp,mp (default: 1,cores_per_replica); on a CPU-only machine this "
                                                "many fake devices are made")
    p.add_argument("--topology", default=None,
                   help="compile for this TPU topology without the hardware (e.g. v3:2x2 = a v3-8, v4:2x2x1, "
                        "v5p:2x2x1); needs libtpu (see above). Default: the local devices")
    p.add_argument("--devices", default=None, help=f"device kind, for its memory: {', '.join(DEVICES)} (default: "
                                                   f"what the devices report, or {DEVICE_MEMORY_ENV})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. remat=full early_cast=true adam_dtype=bfloat16 scan_layers=true")
    p.add_argument("--no-train", action="store_true", help="skip the init and train step")
    p.add_argument("--sample-batch", type=int, default=0, help="also check the sampler with this many rows "
                                                               "(0: no sampler)")
    p.add_argument("--prefix", type=int, default=600, help="sampler: shared-prefix tokens (CommonsenseQA's few-shot "
                                                           "prompt is ~600)")
    p.add_argument("--prompt", type=int, default=150, help="sampler: each row's own prompt tokens")
    p.add_argument("--new-tokens", type=int, default=96, help="sampler: new tokens per row")
    p.add_argument("--margin", type=float, default=0.1, help="share of device memory kept free (default 0.1)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.no_train and not args.sample_batch:
        p.error("--no-train leaves nothing to check: add --sample-batch N to check the sampler")

    from .config import load_config
    cfg = load_config(args.config)
    cfg = cfg.replace(**_parse_set(args.set)) if args.set else cfg
    dp, mp = (int(x) for x in (args.mesh or f"1,{cfg.cores_per_replica}").split(","))
    if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={dp * mp}".strip()
    import jax
    from . import sharding
    from .sampling import Sampler
    from .train import Trainer
    devices = jax.devices()
    if args.topology:
        from jax.experimental import topologies
        try:
            devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
        except Exception as e:
            raise ValueError(f"--topology {args.topology}: {e}; it needs libtpu (pip install --target DIR "
                             f"'libtpu==0.0.42.*' and TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so)") from None
    if len(devices) < dp * mp:
        raise ValueError(f"--mesh {dp},{mp} needs {dp * mp} devices; {len(devices)} are visible")
    mesh = sharding.make_mesh(mp, devices[:dp * mp])
    cfg = cfg.replace(cores_per_replica=mp)
    usages = []
    trainer = Trainer(cfg, mesh)
    if not args.no_train:
        usages += training_usage(trainer)
    if args.sample_batch:
        usages.append(sampling_usage(Sampler(trainer.model, mesh=mesh), args.sample_batch, args.prefix, args.prompt,
                                     args.new_tokens))
    kind = devices[0].device_kind
    capacity = device_memory(args.devices or (_KINDS.get(kind) if args.topology else None))
    text, fits = report(usages, capacity, args.margin)
    print(f"{args.config} on mesh (dp={dp}, mp={mp})" + (f" with {' '.join(args.set)}" if args.set else "") +
          f"; compiled for {kind}" + (f" ({args.topology}, deviceless)" if args.topology else ""))
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "mesh": [dp, mp], "set": args.set, "compiled_for": kind,
                   "topology": args.topology, "capacity": capacity, "fits": fits,
                       "usages": [dict(dataclasses.asdict(u), peak=u.peak) for u in usages]}, f, indent=2)
    return 0 if fits or capacity is None else 2


if __name__ == "__main__":
    from .cli_util import run_main
    sys.exit(run_main(main))
