"""Training throughput (tokens/s, MFU, peak memory) of our Trainer, or of HF GPTJForCausalLM as the baseline.

CPU default (the demo's shape, configs/star_arithmetic_tiny.json: 4 layers, d_model 128, seq 256, batch 16, fp32;
pinned to one core; ~20 s each):
    python benchmarks/train.py
    python benchmarks/train.py --hf
    python benchmarks/train.py --attention blocked
    python benchmarks/train.py --compare          # ours (xla), ours (blocked), HF alternately, median of 5 rounds
GPU, the 1.4B GPT-J shape of ../shared/anchors/gpu.md (24 layers, d_model 2048, 8 heads, seq 2048, batch 8,
fp32 master weights, bf16 compute):
    python benchmarks/train.py --gpu                                  # cuDNN attention, remat "dots", scanned layers
    python benchmarks/train.py --gpu --attention xla --remat none     # other settings of the same config keys
    python benchmarks/train.py --gpu --hf                             # HF: bf16 autocast, fused AdamW, eager attention

One process measures one setting (peak memory is per process), except `--compare`, which builds ours with each
attention in --compare-attention and HF in one process and times them alternately, round after round (`--rounds`
of `--steps` steps each), printing each one's median round: on a shared machine a slow spell then hits every
setting alike. Its peak-memory column is "-". Steps are timed after `--warmup` untimed ones
(compilation); tokens/s = batch * seq * steps / wall time. MFU = (6N + 12 L d T) * tokens/s / peak, the formula of
`mesh_transformer.train.flops_per_token` and of the anchors (peak 989 TFLOP/s bf16 dense on an H100/H200). Prints one
markdown table row. Imports neither TensorFlow nor Ray.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_shape_flags, apply_defaults, pin_cpu_threads  # noqa: E402  (benchmarks/, the script's folder)

HEADER = ("| impl | device | layers x d_model, seq, batch | attention | remat | tokens/s | step s | MFU | "
          "peak GiB |\n|---|---|---|---|---|---|---|---|---|")


CPU_DEFAULTS = dict(layers=4, d_model=128, heads=4, vocab=264, rotary=16, seq=256, batch=16, dtype="float32",
                    attention="auto", remat="none", scan=False)
GPU_DEFAULTS = dict(layers=24, d_model=2048, heads=8, vocab=50400, rotary=64, seq=2048, batch=8, dtype="bfloat16",
                    attention="cudnn", remat="dots", scan=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the 1.4B shape, seq 2048, batch 8, bf16 compute, cuDNN "
                                                      "attention, remat dots (flags given explicitly still win)")
    p.add_argument("--hf", action="store_true", help="time HF GPTJForCausalLM instead of ours")
    add_shape_flags(p, CPU_DEFAULTS, GPU_DEFAULTS)
    p.add_argument("--seq", type=int, help="tokens per sequence (CPU default 256; --gpu 2048)")
    p.add_argument("--batch", type=int, help="sequences per step (CPU default 16; --gpu 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype; params stay float32 (CPU default float32; --gpu bfloat16)")
    p.add_argument("--attention", choices=("xla", "blocked", "cudnn", "auto"),
                   help="ours: attention_impl (CPU auto, the config's default: blocked on CPU; --gpu cudnn)")
    p.add_argument("--block-size", type=int, default=64, help="ours: attention_block_size of blocked attention")
    p.add_argument("--compare", action="store_true",
                   help="time ours with each --compare-attention and HF alternately in this one process")
    p.add_argument("--compare-attention", nargs="+", default=["xla", "blocked"],
                   choices=("xla", "blocked", "cudnn", "auto"), help="ours' attention_impl values for --compare")
    p.add_argument("--rounds", type=int, default=5, help="--compare: rounds (each times --steps steps of each)")
    p.add_argument("--remat", choices=("none", "full", "dots"), help="ours: remat policy (CPU none; --gpu dots); "
                                                                     "HF: any value but none turns on "
                                                                     "gradient checkpointing")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                   help="ours: run the layers under lax.scan (CPU default off: at the demo's shape a scanned step is "
                        "10-25%% slower on CPU; --gpu default on: a 24-layer model compiles much faster)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU only: pin the process to this many cores, torch and XLA alike (default 1; 0 = no pin)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    args = apply_defaults(p.parse_args(argv), CPU_DEFAULTS, GPU_DEFAULTS)
    if args.threads is None:
        args.threads = 0 if args.gpu else 1
    return args


def config(args, attention=None):
    from mesh_transformer.config import load_config

    return load_config(dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab,
                            seq=args.seq, pe_rotary_dims=args.rotary, per_replica_batch=args.batch,
                            compute_dtype=args.dtype, attention_impl=attention or args.attention,
                            attention_block_size=args.block_size, remat=args.remat,
                            scan_layers=args.scan, warmup_steps=10, anneal_steps=1000, lr=1e-4,
                            end_lr=1e-5, weight_decay=0.1))


def ours_runner(args, cfg):
    """A function of n that runs n training steps and returns their wall seconds (after --warmup steps)."""
    import jax
    import numpy as np

    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.train import Trainer

    trainer = Trainer(cfg, make_mesh(1, jax.devices()[:1]))
    box = [trainer.init_state(jax.random.PRNGKey(0))]
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (1, args.batch, args.seq + 1))
    batch = {"tokens": jax.device_put(tokens, trainer.batch_sharding(3))}

    def run(n):
        if n == 0:
            return 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            box[0], metrics = trainer.train_step(box[0], batch)
        loss = float(metrics["loss"])  # waits for the last step, hence for all of them
        assert np.isfinite(loss), f"loss is {loss}"
        return time.perf_counter() - t0

    run(args.warmup)
    return run


def time_ours(args, cfg):
    """(seconds per step, peak bytes or None, device name)."""
    import jax

    elapsed = ours_runner(args, cfg)(args.steps)
    stats = jax.devices()[0].memory_stats() or {}
    return elapsed / args.steps, stats.get("peak_bytes_in_use"), jax.devices()[0].device_kind


def hf_runner(args, cfg):
    """(a function of n that runs n HF training steps and returns their wall seconds, device name)."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from mesh_transformer.hf import hf_config_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = GPTJForCausalLM(GPTJConfig(**hf_config_dict(cfg, eos_token_id=cfg.n_vocab - 1))).train()
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda")
    ids = torch.randint(0, cfg.n_vocab, (args.batch, args.seq), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n):
        if n == 0:
            return 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        float(loss.detach())
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(args.warmup)
    return run, (torch.cuda.get_device_name() if device == "cuda" else "cpu")


def time_hf(args, cfg):
    import torch

    run, name = hf_runner(args, cfg)
    elapsed = run(args.steps)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return elapsed / args.steps, peak, name


def attention_label(args, attention: str) -> str:
    """The attention column: the implementation that ran ("auto" resolved), with the block size when blocked."""
    from mesh_transformer.layers import resolve_attention_impl

    impl = resolve_attention_impl(attention)
    label = impl + (f" {args.block_size}" if impl == "blocked" else "")
    return f"auto: {label}" if attention == "auto" else label


def row(args, cfg, impl, device, attention, step_s, peak, peak_flops) -> str:
    from mesh_transformer.train import flops_per_token

    tps = args.batch * args.seq / step_s
    mfu = f"{100 * flops_per_token(cfg, args.seq) * tps / peak_flops:.1f}%" if peak_flops else "-"
    mem = f"{peak / 2**30:.1f}" if peak else "-"
    return (f"| {impl} | {device} | {args.layers} x {args.d_model}, {args.seq}, {args.batch} | {attention} | "
            f"{args.remat} | {tps:,.0f} | {step_s:.3f} | {mfu} | {mem} |")


def compare(args) -> None:
    """Ours with each --compare-attention, then HF, alternately for --rounds rounds; one row each (median round)."""
    import statistics

    import jax

    from mesh_transformer.train import device_peak_flops

    cfgs = {att: config(args, att) for att in args.compare_attention}
    runners = {att: ours_runner(args, cfg) for att, cfg in cfgs.items()}
    hf_run, hf_device = hf_runner(args, cfgs[args.compare_attention[0]])
    runners["hf"] = hf_run
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            times[name].append(run(args.steps) / args.steps)
    print(f"alternating, {args.rounds} rounds x {args.steps} steps, median round; "
          f"{args.threads or 'all'} core(s)")
    print(HEADER)
    device = jax.devices()[0].device_kind
    for att, cfg in cfgs.items():
        print(row(args, cfg, "ours" + (" (scan)" if args.scan else ""), device,
                  attention_label(args, att), statistics.median(times[att]), None,
                  device_peak_flops()))
    hf_peak = 989e12 if "H100" in hf_device or "H200" in hf_device else None
    print(row(args, cfgs[args.compare_attention[0]], "HF GPTJForCausalLM", hf_device, "eager",
              statistics.median(times["hf"]), None, hf_peak), flush=True)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.threads:  # before jax / torch start their thread pools
        pin_cpu_threads(args.threads)
    if args.compare:
        compare(args)
        assert "tensorflow" not in sys.modules and "ray" not in sys.modules
        return
    cfg = config(args)
    from mesh_transformer.train import device_peak_flops

    step_s, peak, device = (time_hf if args.hf else time_ours)(args, cfg)
    peak_flops = device_peak_flops() if not args.hf else (989e12 if "H100" in device or "H200" in device else None)
    impl = "HF GPTJForCausalLM" if args.hf else "ours" + (" (scan)" if args.scan else "")
    attention = "eager" if args.hf else attention_label(args, args.attention)
    print(HEADER)
    print(row(args, cfg, impl, device, attention, step_s, peak, peak_flops), flush=True)
    assert "tensorflow" not in sys.modules and "ray" not in sys.modules


if __name__ == "__main__":
    from mesh_transformer.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # before jax: malloc tunables for XLA:CPU (host_malloc.py)
    main()
