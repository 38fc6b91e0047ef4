"""The model's oracle checks, run on whatever device JAX finds first (a GPU on the device machine).

The test suite runs these comparisons on CPU; this script repeats them where the kernels differ (cuBLAS, cuDNN,
TF32 defaults), and adds the one check a CPU cannot run: cuDNN's fused attention (`attention_impl: cudnn`) against
our XLA attention, forward and backward. Each line prints PASS/FAIL with the measured error; exit status 1 on any
FAIL. It imports neither TensorFlow nor Ray, so the dm-haiku and jmp wheels are all it needs besides jax/torch.

    python benchmarks/gpu_check.py            # ~1 min on a GPU (mostly compiles), ~1 min on 2 CPU cores
"""
from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mesh_transformer.model import CausalTransformer  # noqa: E402
from mesh_transformer.sampling import Sampler  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.train import Trainer  # noqa: E402
from mesh_transformer.config import load_config  # noqa: E402

TINY = dict(layers=2, d_model=256, n_heads=4, n_vocab=1000, seq=256, pe_rotary_dims=32, compute_dtype="float32")
FAILS: list = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def noisy_params(model: CausalTransformer, seed: int = 0):
    """Random params where biases and LayerNorms are not the init's zeros/ones, so every weight is exercised."""
    params = model.init(jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def check_hf_logits(backend_device: str) -> None:
    """fp32 logits against HF GPTJForCausalLM (TF32 off on both sides)."""
    import torch
    from transformers import GPTJForCausalLM

    from mesh_transformer.hf import save_hf_gptj

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = CausalTransformer(TINY)
    params = noisy_params(model)
    tokens = np.random.default_rng(0).integers(0, TINY["n_vocab"], (4, 128))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(model.logits)(params, jnp.asarray(tokens)))
    with tempfile.TemporaryDirectory() as d:
        save_hf_gptj(model.config, jax.device_get(params), d, eos_token_id=TINY["n_vocab"] - 1)
        hf = GPTJForCausalLM.from_pretrained(d, torch_dtype=torch.float32).to(backend_device).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, device=backend_device)).logits.float().cpu().numpy()
    err = float(np.abs(ours - theirs).max())
    report("fp32 logits == HF GPTJForCausalLM", err < 1e-3, f"max |diff| {err:.2e} over {ours.size:,} logits "
           f"(scale {np.abs(theirs).max():.1f}; torch on {backend_device})")


def check_cached_decoding() -> None:
    """Greedy tokens from the KV-cache sampler == argmax of a full forward pass over prompt + generated tokens."""
    model = CausalTransformer(TINY)
    params = noisy_params(model, seed=3)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, TINY["n_vocab"], n).tolist() for n in (5, 17, 40, 64)]
    new = 32
    with jax.default_matmul_precision("highest"):
        out = Sampler(model, params, make_mesh(1, jax.devices()[:1])).sample(prompts, new)
        logits_fn = jax.jit(model.logits)
        mismatches = 0
        margin_at_miss = []
        for p, gen in zip(prompts, out.tokens):
            full = np.asarray(p + gen.tolist())[None]
            logits = np.asarray(logits_fn(params, jnp.asarray(full)))[0]  # [T, V]
            predicted = logits[len(p) - 1:-1].argmax(-1)  # [new]
            for t in np.nonzero(predicted != gen)[0]:
                mismatches += 1
                top2 = np.sort(logits[len(p) - 1 + t])[-2:]
                margin_at_miss.append(float(top2[1] - top2[0]))
    ok = mismatches == 0 or max(margin_at_miss) < 1e-4  # a near-tie may flip; anything else is a bug
    report("cached greedy decoding == full forward argmax", ok,
           f"{mismatches} of {len(prompts) * new} tokens differ" +
           (f" (logit margins {margin_at_miss})" if mismatches else ""))


def check_cudnn_attention() -> None:
    """attention_impl cudnn vs xla: bf16 logits and gradients of the training loss."""
    if jax.default_backend() != "gpu":
        report("cuDNN attention == XLA attention", True, "skipped: needs an NVIDIA GPU")
        return
    base = dict(TINY, compute_dtype="bfloat16", seq=512)
    xla = CausalTransformer(dict(base, attention_impl="xla"))
    cudnn = CausalTransformer(dict(base, attention_impl="cudnn"))
    params = noisy_params(xla, seed=5)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, base["n_vocab"], (4, 512)))
    la = np.asarray(jax.jit(xla.logits)(params, tokens))
    lb = np.asarray(jax.jit(cudnn.logits)(params, tokens))
    rel = float(np.abs(la - lb).max() / np.abs(la).max())
    report("cuDNN attention logits == XLA attention (bf16)", rel < 2e-2, f"max |diff| / max |logit| {rel:.2e}")

    def grads(model):
        return jax.jit(jax.grad(lambda p: model.loss(p, tokens[:, :-1], tokens[:, 1:])[0]))(params)

    ga, gb = grads(xla), grads(cudnn)
    diff = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))))
    norm = float(jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(ga))))
    report("cuDNN attention gradients == XLA attention (bf16)", diff / norm < 5e-2,
           f"|g_cudnn - g_xla| / |g_xla| = {diff / norm:.2e}")


def check_training_step() -> None:
    """A few bf16 train steps on one repeated batch lower the loss (the jitted, donated step runs on the device)."""
    cfg = load_config(dict(TINY, compute_dtype="bfloat16", per_replica_batch=4, lr=3e-3, end_lr=3e-3,
                           warmup_steps=0, anneal_steps=1000))
    trainer = Trainer(cfg, make_mesh(1, jax.devices()[:1]))
    state = trainer.init_state(jax.random.PRNGKey(0))
    batch = {"tokens": jnp.asarray(np.random.default_rng(3).integers(0, cfg.n_vocab, (1, 4, 65)))}
    losses = []
    for _ in range(20):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["ce"]))
    report("bf16 training lowers the loss", losses[-1] < 0.5 * losses[0],
           f"cross entropy {losses[0]:.3f} -> {losses[-1]:.3f} in 20 steps")


def main() -> int:
    dev = jax.devices()[0]
    print(f"# jax {jax.__version__} on {jax.default_backend()} ({dev.device_kind})", flush=True)
    torch_device = "cpu"
    try:
        import torch
        if jax.default_backend() == "gpu" and torch.cuda.is_available():
            torch_device = "cuda"
    except ImportError:
        pass
    checks = {"check_hf_logits": lambda: check_hf_logits(torch_device), "check_cached_decoding": check_cached_decoding,
              "check_cudnn_attention": check_cudnn_attention, "check_training_step": check_training_step}
    for name, check in checks.items():
        try:
            check()
        except Exception as e:  # one broken check must not hide the others' results
            report(name, False, f"raised {type(e).__name__}: {e}")
    assert "tensorflow" not in sys.modules and "ray" not in sys.modules
    print(f"# {len(FAILS)} failed" if FAILS else "# all passed", flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
