"""New tokens/s of our Sampler vs HF `GPTJForCausalLM.generate(do_sample=False)` on the same weights and shapes.

CPU default (a tiny GPT-J, fp32; minutes on 2 cores):
    python benchmarks/sample.py
GPU, GPT-J-6B shapes with random bf16 weights, prompt 600 + 96 new, batch 1 / 8 / 64:
    python benchmarks/sample.py --gpu
    python benchmarks/sample.py --gpu --prefix-len 600 --prompt-len 150   # CommonsenseQA-like: shared few-shot prompt

Every row has prefix-len + prompt-len prompt tokens and exactly `--new` new tokens (EOS ignored on both sides:
min_new_tokens = max_new_tokens for HF). Only new tokens count: tokens/s = batch * new / wall time of one call,
prefill included. On CPU both run pinned to `--threads` cores (default 1). Each configuration is run once to compile
/ warm up, then `--repeats` rounds call ours and HF in turn (the median of each is kept), so both see the same load. "ours" runs the full prompt; "ours+prefix" (when prefix-len > 0) shares the prefix's keys/values, computed once and
cached across calls, as STaR's few-shot prompts are. This script imports neither TensorFlow nor Ray.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_shape_flags, apply_defaults, pin_cpu_threads  # noqa: E402  (benchmarks/, the script's folder)


CPU_DEFAULTS = dict(layers=4, d_model=256, heads=4, vocab=1024, rotary=32, batch="8,64", prefix_len=64,
                    prompt_len=16, new=32, dtype="float32", hf_weights="disk")
GPU_DEFAULTS = dict(layers=28, d_model=4096, heads=16, vocab=50400, rotary=64, batch="1,8,64", prefix_len=0,
                    prompt_len=600, new=96, dtype="bfloat16", hf_weights="memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="GPT-J-6B shapes, bf16, batch 1,8,64, prompt 600, 96 new (flags given explicitly still win)")
    add_shape_flags(p, CPU_DEFAULTS, GPU_DEFAULTS)
    p.add_argument("--batch", type=str, help="comma-separated batch sizes (CPU default 8,64; --gpu 1,8,64)")
    p.add_argument("--prefix-len", type=int, help="shared prompt tokens per row (CPU default 64; --gpu 0)")
    p.add_argument("--prompt-len", type=int, help="own prompt tokens per row (CPU default 16; --gpu 600)")
    p.add_argument("--new", type=int, help="new tokens per row (CPU default 32; --gpu 96)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights and compute (CPU default float32; "
                                                                       "--gpu bfloat16)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds; each round calls every contender once, in turn; the median is kept")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU only: pin the process to this many cores, torch and XLA alike (default 1: on a shared "
                        "2-core machine torch's OpenMP threads otherwise slow down up to 30x under load; 0 = no pin)")
    p.add_argument("--scan-layers", action="store_true", help="run layers under lax.scan (faster compiles)")
    p.add_argument("--skip-hf", action="store_true", help="time only our sampler")
    p.add_argument("--hf-weights", choices=("disk", "memory"),
                   help="how HF gets our weights: save_hf_gptj + from_pretrained (CPU default), or copied in memory "
                        "through DLPack (--gpu default; no 12 GB file)")
    args = apply_defaults(p.parse_args(argv), CPU_DEFAULTS, GPU_DEFAULTS)
    args.batch = [int(b) for b in args.batch.split(",")]
    return args


def hf_model(cfg, params, how: str, device: str, dtype: str):
    """GPTJForCausalLM holding our weights."""
    import numpy as np
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from mesh_transformer.hf import hf_config_dict, save_hf_gptj

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    eos = min(50256, cfg.n_vocab - 1)  # never reached: generation is forced to max_new_tokens
    if how == "disk":
        with tempfile.TemporaryDirectory() as d:
            save_hf_gptj(cfg, params, d, dtype=dtype, eos_token_id=eos)
            model = GPTJForCausalLM.from_pretrained(d, torch_dtype=tdtype)
        return model.to(device).eval()
    import jax

    from mesh_transformer.hf import _LAYER_MAP

    with torch.device(device):
        torch.set_default_dtype(tdtype)
        model = GPTJForCausalLM(GPTJConfig(**hf_config_dict(cfg, eos_token_id=eos))).eval()
        torch.set_default_dtype(torch.float32)

    def t(x):  # jax array -> torch tensor on `device`, zero-copy where DLPack allows
        try:
            return torch.from_dlpack(x).to(device)
        except Exception:
            return torch.from_numpy(np.asarray(jax.device_get(x), np.float32)).to(device)

    sd = model.state_dict()
    with torch.no_grad():
        sd["transformer.wte.weight"].copy_(t(params["embedding"]["w"]) + t(params["embedding"]["b"])[None])
        sd["transformer.ln_f.weight"].copy_(t(params["projection/ln_f"]["scale"]))
        sd["transformer.ln_f.bias"].copy_(t(params["projection/ln_f"]["offset"]))
        sd["lm_head.weight"].copy_(t(params["projection/lm_head"]["w"]).T)
        sd["lm_head.bias"].copy_(t(params["projection/lm_head"]["b"]))
        for (mod, name), (suffix, transpose) in _LAYER_MAP.items():
            stacked = t(params[f"layers/block/{mod}"][name])
            for i in range(cfg.layers):
                sd[f"transformer.h.{i}.{suffix}"].copy_(stacked[i].T if transpose else stacked[i])
    return model


def time_alternating(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable over `repeats` rounds, one call of each per round in turn (after one
    untimed warm-up call each), so that a change in the machine's load hits every contender alike."""
    import statistics
    for fn in fns.values():
        fn()  # compile / warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    args = parse_args(argv)
    if not args.gpu and args.threads is None:
        args.threads = 1
    # JAX would otherwise take 75% of GPU memory up front and leave HF too little
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.threads:  # before jax / torch start their thread pools
        pin_cpu_threads(args.threads)
    import jax
    import numpy as np

    from mesh_transformer.model import CausalTransformer
    from mesh_transformer.sampling import Sampler
    from mesh_transformer.sharding import make_mesh

    backend = jax.default_backend()
    cfg = dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab,
               seq=max(2048, args.prefix_len + args.prompt_len + args.new), pe_rotary_dims=args.rotary,
               compute_dtype=args.dtype, early_cast=args.dtype == "bfloat16", scan_layers=args.scan_layers)
    model = CausalTransformer(cfg)
    mesh = make_mesh(1, jax.devices()[:1])
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    sampler = Sampler(model, params, mesh)
    device_name = jax.devices()[0].device_kind
    pinned = f", pinned to {args.threads} core(s)" if args.threads and backend == "cpu" else ""
    print(f"# backend {backend} ({device_name}{pinned}); model layers {args.layers}, d_model {args.d_model}, heads "
          f"{args.heads}, vocab {args.vocab}, {args.dtype}; prompt {args.prefix_len}+{args.prompt_len}, "
          f"{args.new} new tokens; median of {args.repeats} alternating rounds")

    hf = None
    if not args.skip_hf:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
        hf = hf_model(model.config, params if args.hf_weights == "memory" else jax.device_get(params),
                      args.hf_weights, device, args.dtype)

    rng = np.random.default_rng(0)
    prefix = rng.integers(0, args.vocab, args.prefix_len).tolist()
    rows = []
    for b in args.batch:
        own = rng.integers(0, args.vocab, (b, args.prompt_len))
        full = [prefix + r.tolist() for r in own]
        out = {}

        def ours():
            out["ours"] = sampler.sample(full, args.new)

        fns = {"ours": ours}
        if args.prefix_len:
            fns["ours+prefix"] = lambda: sampler.sample(own.tolist(), args.new, prefix=prefix)
        match = ""
        if hf is not None:
            import torch

            ids = torch.tensor(full, dtype=torch.long, device=hf.device)
            mask = torch.ones_like(ids)

            def run_hf():
                with torch.no_grad():
                    out["hf"] = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new,
                                            min_new_tokens=args.new, pad_token_id=0)
                if ids.is_cuda:
                    torch.cuda.synchronize()

            fns["hf"] = run_hf
        res = time_alternating(fns, args.repeats)
        if hf is not None:
            agree = (out["hf"][:, ids.shape[1]:].cpu().numpy() == out["ours"].tokens).mean()
            match = f"{100 * agree:.0f}%"
            del out["hf"]
            if ids.is_cuda:
                torch.cuda.empty_cache()
        rows.append((b, res, match))

    new = args.new
    print("| batch | " + " | ".join(f"{k} new tok/s" for k in rows[0][1]) +
          (" | ours / hf | ours+prefix / hf | greedy tokens equal" if hf is not None else "") + " |")
    print("|" + "---|" * (1 + len(rows[0][1]) + (3 if hf is not None else 0)))
    for b, res, match in rows:
        tps = {k: b * new / v for k, v in res.items()}
        cells = [f"{tps[k]:,.0f}" for k in res]
        if hf is not None:
            cells.append(f"{tps['ours'] / tps['hf']:.2f}x")
            cells.append(f"{tps['ours+prefix'] / tps['hf']:.2f}x" if "ours+prefix" in tps else "-")
            cells.append(match)
        print(f"| {b} | " + " | ".join(cells) + " |")
    assert "tensorflow" not in sys.modules and "ray" not in sys.modules, "the benchmark must not import TF or Ray"


if __name__ == "__main__":
    from mesh_transformer.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # before jax: malloc tunables for XLA:CPU (host_malloc.py)
    main()
