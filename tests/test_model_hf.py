"""GPT-J parity with HF `transformers.GPTJForCausalLM` on the same weights, HF import/export round trips, and
equivalence of the execution options (scan over layers, remat policies, bf16 compute) with the plain forward pass.

The parameters are random (tests/helpers.random_params) with non-trivial biases, LayerNorm scales/offsets and embedding
bias (folded into HF's wte on export): a mapping error on any leaf changes the logits.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mesh_transformer.config import load_config  # noqa: E402
from mesh_transformer.hf import load_hf_gptj, save_hf_gptj  # noqa: E402
from mesh_transformer.model import CausalTransformer  # noqa: E402

from helpers import random_params  # noqa: E402

PARITY_TOL = 1e-4  # max|ours - HF| / max|HF| in float32


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    raw: dict
    tokens_used: int  # token ids drawn from [0, tokens_used): a tokenizer smaller than the padded vocab


CASES = [
    # rotary on part of the head only (GPT-J-6B rotates 64 of 256 dims)
    Case("partial_rotary", dict(layers=2, d_model=64, n_heads=4, n_vocab=256, seq=32, pe_rotary_dims=8), 256),
    # vocabulary padded above the tokenizer (GPT-J: 50257 used of 50400), whole-head rotary, odd head count
    Case("padded_vocab", dict(layers=2, d_model=48, n_heads=3, n_vocab=320, seq=32), 300),
    # deeper, d_ff other than 4 d_model
    Case("three_layers", dict(layers=3, d_model=64, n_heads=2, n_vocab=128, seq=32, pe_rotary_dims=16, d_ff=96), 128),
]


def hf_logits(model_dir, tokens: np.ndarray, dtype=None) -> np.ndarray:
    model = transformers.GPTJForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request, tmp_path_factory):
    """Builds a random tiny model (non-trivial biases and LN), saves it as an HF folder and computes our fp32 logits once per case."""
    c = request.param
    cfg = load_config({**c.raw, "compute_dtype": "float32"})
    model = CausalTransformer(cfg)
    params = random_params(model, seed=1)
    tokens = np.random.RandomState(0).randint(0, c.tokens_used, (2, 24))
    logits_fn = jax.jit(model.logits)
    ours = np.asarray(logits_fn(params, jnp.asarray(tokens)))
    hf_dir = tmp_path_factory.mktemp(f"hf_{c.name}")
    save_hf_gptj(cfg, params, str(hf_dir), eos_token_id=c.tokens_used - 1)
    return dict(case=c, cfg=cfg, logits_fn=logits_fn, params=params, tokens=tokens, ours=ours, hf_dir=hf_dir)


def test_hf_logit_parity(case):
    """save_hf_gptj -> GPTJForCausalLM.from_pretrained (fp32) gives our logits."""
    ref = hf_logits(case["hf_dir"], case["tokens"])
    assert ref.shape == case["ours"].shape == (2, 24, case["cfg"].n_vocab)
    ratio = rel_err(case["ours"], ref)
    print(f"\nHF parity [{case['case'].name}]: max|diff|/max|ref| = {ratio:.3e} (max|ref| = {np.abs(ref).max():.2f})")
    assert ratio < PARITY_TOL


def test_hf_import_gives_same_logits_and_round_trip_is_bit_exact(case, tmp_path):
    """load_hf_gptj -> our logits equal the original's; load -> save -> load is bit-exact on every leaf."""
    cfg1, p1 = load_hf_gptj(str(case["hf_dir"]), compute_dtype="float32")
    for key in ("layers", "d_model", "n_heads", "n_vocab", "seq", "rotary_dims", "ffn_dim"):
        assert getattr(cfg1, key) == getattr(case["cfg"], key), key
    logits = np.asarray(case["logits_fn"](p1, jnp.asarray(case["tokens"])))  # same shapes: no recompile
    assert rel_err(logits, case["ours"]) < PARITY_TOL  # embedding bias folded into wte: equal up to rounding

    save_hf_gptj(cfg1, p1, str(tmp_path / "again"))
    cfg2, p2 = load_hf_gptj(str(tmp_path / "again"), compute_dtype="float32")
    assert cfg2 == cfg1
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for path, a in jax.tree_util.tree_leaves_with_path(p1):
        b = p2
        for k in path:
            b = b[k.key]
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), jax.tree_util.keystr(path)


def test_hf_bf16_export(case, tmp_path):
    """dtype="bfloat16" writes bf16 safetensors that HF loads as bf16 and we load back to the rounded weights."""
    out = tmp_path / "bf16"
    save_hf_gptj(case["cfg"], case["params"], str(out), dtype="bfloat16", eos_token_id=case["case"].tokens_used - 1)
    model = transformers.GPTJForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        ref16 = model(torch.as_tensor(case["tokens"], dtype=torch.long)).logits.float().numpy()
    ratio = rel_err(case["ours"], ref16)
    print(f"\nHF bf16 export [{case['case'].name}]: max|diff|/max|ref| vs our fp32 = {ratio:.3e}")
    assert ratio < 0.1  # bf16 weights and bf16 arithmetic: loose

    _, p16 = load_hf_gptj(str(out))
    q = np.asarray(case["params"]["layers/block/q"]["w"])
    assert np.array_equal(p16["layers/block/q"]["w"], q.astype(ml_dtypes.bfloat16).astype(np.float32))
    folded = np.asarray(case["params"]["embedding"]["w"]) + np.asarray(case["params"]["embedding"]["b"])
    assert np.array_equal(p16["embedding"]["w"], folded.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_torch_built_gptj_imports(tmp_path):
    """An HF GPT-J made in torch (random init + noise), save_pretrained (safetensors) -> load_hf_gptj -> our logits
    equal HF's."""
    hf_cfg = transformers.GPTJConfig(vocab_size=192, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                     n_inner=None, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPTJForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
    tokens = np.random.RandomState(1).randint(0, 192, (2, 20))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()

    cfg, params = load_hf_gptj(str(tmp_path), compute_dtype="float32")
    assert (cfg.layers, cfg.d_model, cfg.n_heads, cfg.n_vocab, cfg.rotary_dims, cfg.ffn_dim) == (2, 64, 4, 192, 8, 256)
    ours = np.asarray(jax.jit(CausalTransformer(cfg).logits)(params, jnp.asarray(tokens)))
    ratio = rel_err(ours, ref)
    print(f"\nHF parity [torch-built]: max|diff|/max|ref| = {ratio:.3e}")
    assert ratio < PARITY_TOL


# ---------------------------------------------------------------------------------------------------------------
# Execution options: scan, remat and the compute dtype change speed/memory, never the function
# ---------------------------------------------------------------------------------------------------------------
_BASE = dict(layers=2, d_model=64, n_heads=4, n_vocab=128, seq=32, pe_rotary_dims=8, compute_dtype="float32")


@pytest.fixture(scope="module")
def reference():
    model = CausalTransformer(_BASE)
    params = random_params(model, seed=3)
    rs = np.random.RandomState(2)
    tokens = jnp.asarray(rs.randint(0, 128, (2, 16)))
    targets = jnp.asarray(rs.randint(0, 128, (2, 16)))
    return params, tokens, targets, _logits_and_grads(model, params, tokens, targets)


def _logits_and_grads(model, params, tokens, targets):
    @jax.jit
    def f(params):
        logits = model.logits(params, tokens)
        grads = jax.grad(lambda p: model.loss(p, tokens, targets, z_loss=True)[0])(params)
        return logits, grads
    return jax.device_get(f(params))


@pytest.mark.parametrize("options", [dict(scan_layers=True), dict(remat="full"), dict(remat="dots")],
                         ids=str)
def test_scan_and_remat_match_default(reference, options):
    params, tokens, targets, (ref_logits, ref_grads) = reference
    logits, grads = _logits_and_grads(CausalTransformer({**_BASE, **options}), params, tokens, targets)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_bf16_compute_close_to_fp32(reference):
    params, tokens, _, (ref_logits, _) = reference
    logits = np.asarray(jax.jit(CausalTransformer({**_BASE, "compute_dtype": "bfloat16"}).logits)(params, tokens))
    assert logits.dtype == np.float32
    ratio = rel_err(logits, ref_logits)
    print(f"\nbf16 vs fp32 compute: max|diff|/max|ref| = {ratio:.3e}")
    assert ratio < 5e-2
