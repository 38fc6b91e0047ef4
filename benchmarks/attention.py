"""Causal attention alone, forward + backward, on one pinned CPU core: `xla` (the square, layers.segment_attention)
against `blocked` (mesh_transformer/attention.py) with its custom VJP and with autodiff of its loop, per block size.

    python benchmarks/attention.py                     # the demo's shape: B 16, T 256, H 4, Dh 32, fp32
    python benchmarks/attention.py --blocks 32 64 128 --repeats 5

The settings run alternately, round after round, and each prints the median of its rounds (the machine is shared,
so a slow spell hits every setting alike). Prints one markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import pin_cpu_threads  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: --heads)")
    p.add_argument("--d-head", type=int, default=32)
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--repeats", type=int, default=5, help="rounds; each times --calls calls of every setting")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="pin to this many cores (0 = no pin)")
    args = p.parse_args(argv)
    if args.threads:
        pin_cpu_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mesh_transformer.attention import blocked_attention
    from mesh_transformer.layers import KVSegment, causal_mask, segment_attention

    b, t, h, dh = args.batch, args.seq, args.heads, args.d_head
    hkv = args.kv_heads or h
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)  # [B, T, H, Dh]
    k = jnp.asarray(rng.normal(size=(b, t, hkv, dh)), jnp.float32)  # [B, T, Hkv, Dh]
    v = jnp.asarray(rng.normal(size=(b, t, hkv, dh)), jnp.float32)
    valid = jnp.ones((b, t), bool)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))

    def xla(q, k, v):
        seg = KVSegment(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), causal_mask(valid, pos))
        return segment_attention(q, [seg])

    impls = {"xla": xla}
    for blk in args.blocks:
        impls[f"blocked {blk}, custom VJP"] = lambda q, k, v, blk=blk: blocked_attention(q, k, v, valid, pos, None, blk)
        impls[f"blocked {blk}, autodiff"] = lambda q, k, v, blk=blk: blocked_attention(q, k, v, valid, pos, None, blk,
                                                                                     custom_vjp=False)
    steps = {}
    for name, f in impls.items():
        steps[name] = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
        jax.block_until_ready(steps[name](q, k, v))
    times = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = step(q, k, v)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / args.calls)
    base = statistics.median(times["xla"])
    print(f"B {b}, T {t}, H {h}, Hkv {hkv}, Dh {dh}, fp32, {args.threads or 'all'} core(s), "
          f"median of {args.repeats} rounds x {args.calls} calls, forward + backward")
    print("| attention | ms per fwd+bwd | speed-up over xla |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1e3 * med:.2f} | {base / med:.2f}x |")


if __name__ == "__main__":
    from mesh_transformer.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # before jax: malloc tunables for XLA:CPU (host_malloc.py)
    main()
