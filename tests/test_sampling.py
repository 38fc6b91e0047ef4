"""Sampler tests: cached decode == full forward, greedy == HF generate, shared prefix == unshared, sharded ==
unsharded, batch == rows one by one, stop rules, seeded sampling, top-k / top-p filtering.

Compiles dominate the run time on CPU (~10 s per sampler shape), so tests share a few samplers and shapes:
batch 4, prompts padded to 16, 8 new tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.model import CausalTransformer
from mesh_transformer.sampling import (Sampler, bucket_length, decode_step, filter_logits, kv_cache_bytes, prefill,
                                       sample_tokens, sampler_kv_bytes, split_shared_prefix, tokens_containing,
                                       truncate_at_stop)
from mesh_transformer.sharding import make_mesh

from helpers import hf_greedy, left_pad

CFG = dict(layers=2, d_model=64, n_heads=4, n_vocab=260, seq=128, pe_rotary_dims=8, d_ff=128,
           compute_dtype="float32", tokenizer="byte")
N_NEW = 8
# mixed lengths, all <= 16 tokens so one bucket (16) serves every batch of the shared shape
PROMPTS = [[5, 17, 99], [200, 3, 3, 8, 41, 77, 120, 250, 9, 30, 64], [7] * 16, [11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    return CausalTransformer(CFG)


@pytest.fixture(scope="module")
def params(model):
    return jax.jit(model.init)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sampler(model, params):
    return Sampler(model, params)


@pytest.fixture(scope="module")
def greedy(sampler):
    return sampler.sample(PROMPTS, N_NEW)


def full_logits(model, params, rows):
    """Reference: one uncached forward over right-padded rows (causal, so padding after a token cannot change it)."""
    t = max(len(r) for r in rows)
    toks = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    return np.asarray(jax.jit(model.logits)(params, toks))


# ---------------------------------------------------------------------------------------------------------------
# cached decoding == full forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_prefix", [False, True])
def test_decode_steps_match_full_forward(model, params, with_prefix):
    """prefill + decode_step over the cache (with and without a shared prefix), teacher-forced, give
    the logits of one uncached forward pass over the same tokens."""
    rng = np.random.default_rng(0)
    prefix = [int(x) for x in rng.integers(0, 256, 5)] if with_prefix else []
    prompts = [p[:n] for p, n in zip(PROMPTS, (3, 7, 1, 5))]
    follow = rng.integers(0, 256, (len(prompts), 6)).astype(np.int32)  # teacher-forced continuation
    p_len, tp, b = len(prefix), 8, len(prompts)
    slots = tp + follow.shape[1]

    toks, valid, positions = left_pad(prompts, tp, p_len)
    plen = np.array([len(p) for p in prompts])
    pkv = None
    if with_prefix:
        pkv, _ = model.prefix_kv(params, jnp.asarray([prefix], jnp.int32))

    run_prefill = jax.jit(lambda p, t, pos, val, pk: prefill(model, p, t, pos, val, slots, pk))
    run_step = jax.jit(lambda p, c, t, pos, s, pk: decode_step(model, p, c, t, pos, s, pk))
    logits, cache = run_prefill(params, toks, positions, valid, pkv)
    got = [np.asarray(logits)]
    for j in range(follow.shape[1]):
        logits, cache = run_step(params, cache, follow[:, j], p_len + plen + j, tp + j, pkv)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)  # [B, 1 + steps, V]

    rows = [prefix + p + list(f) for p, f in zip(prompts, follow)]
    ref = full_logits(model, params, rows)
    for i, p in enumerate(prompts):
        start = p_len + len(p) - 1  # logits after the last prompt token, then after each forced token
        want = ref[i, start:start + follow.shape[1] + 1]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sampler_logprobs_match_full_forward(model, params, greedy):
    rows = [p + list(t[:n]) for p, t, n in zip(PROMPTS, greedy.tokens, greedy.lengths)]
    ref = jax.nn.log_softmax(full_logits(model, params, rows), axis=-1)
    for i, p in enumerate(PROMPTS):
        n = greedy.lengths[i]
        steps = np.arange(len(p) - 1, len(p) - 1 + n)
        want = np.asarray(ref[i, steps, greedy.tokens[i, :n]])
        np.testing.assert_allclose(greedy.logprobs[i, :n], want, rtol=1e-5, atol=1e-5)
        # greedy: every chosen token is the argmax of the full forward's logits
        np.testing.assert_array_equal(np.asarray(ref[i, steps]).argmax(-1), greedy.tokens[i, :n])


# ---------------------------------------------------------------------------------------------------------------
# greedy == HF GPTJForCausalLM.generate on the same weights, mixed lengths, left padding
# ---------------------------------------------------------------------------------------------------------------
def test_greedy_matches_hf_generate(model, params, greedy, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mesh_transformer.hf import save_hf_gptj

    save_hf_gptj(model.config, params, str(tmp_path), eos_token_id=259)
    hf = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    hf_new = hf_greedy(hf, PROMPTS, N_NEW)
    assert (greedy.lengths == N_NEW).all()
    for i in range(len(PROMPTS)):
        np.testing.assert_array_equal(greedy.tokens[i], hf_new[i], err_msg=f"row {i}")


# ---------------------------------------------------------------------------------------------------------------
# shared prefix, meshes, batching
# ---------------------------------------------------------------------------------------------------------------
def test_shared_prefix_equals_unshared(sampler, greedy):
    prefix = PROMPTS[2][:6]  # 6 tokens that the rows below all start with
    own = [p[:10] for p in PROMPTS]
    unshared_rows = [prefix + o for o in own]
    unshared = sampler.sample(unshared_rows, N_NEW)
    shared = sampler.sample(own, N_NEW, prefix=prefix)
    np.testing.assert_array_equal(shared.tokens, unshared.tokens)
    np.testing.assert_array_equal(shared.lengths, unshared.lengths)
    np.testing.assert_allclose(shared.logprobs, unshared.logprobs, rtol=1e-5, atol=1e-5)
    # the prefix's keys/values are computed once and reused across calls
    cached = sampler.prefix_kv(prefix)
    again = sampler.sample(own, N_NEW, prefix=prefix, temperature=0.7, seed=3)
    assert sampler.prefix_kv(prefix) is cached and len(sampler._prefixes) == 1
    assert again.tokens.shape == (len(own), N_NEW)
    # a row that IS the prefix continues from the prefix's last logits
    only = sampler.sample([[]] + own[1:], N_NEW, prefix=prefix)
    np.testing.assert_array_equal(only.tokens, sampler.sample([prefix] + unshared_rows[1:], N_NEW).tokens)


def test_bf16_shared_prefix_runs_and_matches_unshared(model, params):
    """bf16 compute with a shared prefix: XLA's CPU runtime once rejected the prefix's value product
    (BF16 x BF16 = F32 in "bhts,hsd->bthd"), so this path raised where fp32 and unshared bf16 ran."""
    bf16 = CausalTransformer(dict(CFG, compute_dtype="bfloat16"))
    sampler = Sampler(bf16, params)
    prefix = PROMPTS[2][:6]
    own = [p[:10] for p in PROMPTS]
    shared = sampler.sample(own, N_NEW, prefix=prefix)
    unshared = sampler.sample([prefix + o for o in own], N_NEW)
    same = shared.tokens == unshared.tokens
    assert same.mean() >= 0.9, (shared.tokens, unshared.tokens)  # bf16 rounding may flip a near-tie, then diverge
    first = same.all(axis=1)  # rows that agree throughout: their log-probs agree to bf16 precision
    np.testing.assert_allclose(shared.logprobs[first], unshared.logprobs[first], atol=0.05)


def test_mesh_2x4_equals_single_device(model, params, sampler, greedy):
    sharded = Sampler(model, params, make_mesh(4))  # dp 2 x mp 4 over the 8 CPU devices
    assert dict(sharded.mesh.shape) == {"dp": 2, "mp": 4}
    out = sharded.sample(PROMPTS, N_NEW)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, rtol=1e-5, atol=1e-5)
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    np.testing.assert_array_equal(sharded.sample(PROMPTS, N_NEW, **kw).tokens,
                                  sampler.sample(PROMPTS, N_NEW, **kw).tokens)


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer_cache", "stacked_cache"])
def test_decode_loop_updates_cache_in_place(model, params, scan):
    """No copy of the KV cache in the compiled sampler: the in-place write must come after every layer's read (XLA
    copied the cache twice per step before decode_step tied the write to the logits). Layers unrolled (the
    default), the cache is one [B, H, S, Dh] array per layer (model.split_layers); under scan, one stacked
    [L, B, H, S, Dh] array."""
    sampler = Sampler(CausalTransformer(dict(CFG, scan_layers=True)), params) if scan else Sampler(model, params)
    cfg, b, tp = sampler.config, len(PROMPTS), 16
    args = (jnp.zeros((b, tp), jnp.int32), jnp.ones((b,), jnp.int32), jnp.zeros((b, 2), jnp.uint32), jnp.zeros(b),
            jnp.zeros(b, jnp.int32), jnp.ones(b), np.int32(-1), np.zeros(cfg.n_vocab, bool),
            np.full((4, 4), -3, np.int32))
    hlo = sampler._generate.lower(N_NEW, sampler.params, None, None, *args).compile().as_text()
    layer = f"{b},{cfg.n_heads},{tp + N_NEW - 1},{cfg.d_head}]"
    cache = f"f32[{cfg.layers},{layer}" if scan else f"f32[{layer}"
    assert cache in hlo
    copies = [line for line in hlo.splitlines() if f"{cache}{{" in line and " copy(" in line]
    assert not copies, copies


def test_batch_equals_rows_one_by_one(sampler):
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[1][:9], PROMPTS[2][:13]]  # 9..16 tokens: one bucket for the singles
    seeds = [11, 12, 13, 14]
    kw = dict(temperature=[0.0, 1.0, 0.8, 1.2], top_k=[0, 0, 20, 5], top_p=[1.0, 0.9, 1.0, 0.95])
    batch = sampler.sample(prompts, N_NEW, seed=seeds, **kw)
    for i, p in enumerate(prompts):
        one = sampler.sample([p], N_NEW, seed=[seeds[i]], temperature=kw["temperature"][i], top_k=kw["top_k"][i],
                             top_p=kw["top_p"][i])
        np.testing.assert_array_equal(one.tokens[0], batch.tokens[i], err_msg=f"row {i}")
        np.testing.assert_allclose(one.logprobs[0], batch.logprobs[i], rtol=1e-5, atol=1e-5)


def test_seeded_sampling_reproducible(sampler):
    kw = dict(temperature=1.0)
    a = sampler.sample(PROMPTS, N_NEW, seed=0, **kw)
    b = sampler.sample(PROMPTS, N_NEW, seed=0, **kw)
    c = sampler.sample(PROMPTS, N_NEW, seed=1, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 8, 9, 16, 17, 33, 64, 80, 150, 256, 257, 600, 750)] == \
           [8, 8, 8, 16, 16, 32, 48, 64, 80, 160, 256, 320, 640, 768]


# ---------------------------------------------------------------------------------------------------------------
# stop rules, on a model crafted to continue any token t with t+1, t+2, ...
# ---------------------------------------------------------------------------------------------------------------
class ToyTokenizer:
    """260 tokens: id i is "<i>", except a few multi-character tokens; EOS 259. Greedy longest-match encoding."""
    name = "toy"
    vocab_size = 260
    eos_token_id = 259
    SPECIAL = {50: "a.\nb", 70: "\n", 60: "Z"}

    def __init__(self):
        self.table = [self.SPECIAL.get(i, f"<{i}>") for i in range(self.vocab_size)]
        self.table[self.eos_token_id] = "<|endoftext|>"

    def encode(self, text):
        ids = []
        while text:
            best = max((i for i, s in enumerate(self.table) if text.startswith(s)), key=lambda i: len(self.table[i]))
            ids.append(best)
            text = text[len(self.table[best]):]
        return ids

    def decode(self, ids):
        return "".join(self.table[int(i)] for i in ids)


def successor_params(model, like, seed=1):
    """Every layer is zeroed, so the residual carries the embedding; lm_head maps LN(emb[t]) to token t+1."""
    cfg = model.config
    params = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), like)
    emb = np.random.default_rng(seed).standard_normal((cfg.n_vocab, cfg.d_model)).astype(np.float32)
    normed = (emb - emb.mean(-1, keepdims=True)) / np.sqrt(emb.var(-1, keepdims=True) + 1e-5)  # LN_f output
    params["embedding"]["w"] = emb
    params["projection/ln_f"]["scale"] = np.ones(cfg.d_model, np.float32)
    params["layers/block/ln"]["scale"] = np.ones((cfg.layers, cfg.d_model), np.float32)
    params["projection/lm_head"]["w"] = np.roll(normed.T, 1, axis=1)  # column t+1 = LN(emb[t])
    return params


def test_stop_rules_end_rows_at_the_right_token(model, params):
    sampler = Sampler(model, successor_params(model, params))
    tok = ToyTokenizer()
    n_new = 8
    texts = ["<45>",  # 46 47 48 49 then "a.\nb" (50): a token CONTAINING the stop string "\n"
             "<255>",  # 256 257 258 then EOS (259)
             "<27>",  # 28 29 30 then 31 32: the two-token stop string "<31><32>"
             "<100>",  # runs to max_new_tokens
             "<65>"]  # 66 .. 69 then the token "\n" itself
    stop = ("\n", "<31><32>")
    out = sampler.generate(texts, tok, n_new, stop=stop, batch_size=4)  # 2 batches, the second padded
    assert out == ["<46><47><48><49>a.", "<256><257><258>", "<28><29><30>",
                   "".join(f"<{i}>" for i in range(101, 101 + n_new)), "<66><67><68><69>"]
    # the device stopped each row at that token (lengths include the stop / EOS token)
    prompts = [tok.encode(t) for t in texts]
    stop_tokens = np.concatenate([tokens_containing(tok, s, 260) for s in stop])
    assert sorted(stop_tokens.tolist()) == [50, 70]
    res = sampler.sample(prompts, n_new, eos_id=tok.eos_token_id, stop_tokens=stop_tokens,
                         stop_sequences=[tok.encode("<31><32>")], batch_size=4)
    np.testing.assert_array_equal(res.lengths, [5, 4, 5, 8, 5])
    np.testing.assert_array_equal(res.tokens[1], [256, 257, 258, 259, 259, 259, 259, 259])  # pad = EOS
    # without stop rules every row runs to max_new_tokens
    res = sampler.sample(prompts, n_new, batch_size=4)
    np.testing.assert_array_equal(res.lengths, [n_new] * 5)
    np.testing.assert_array_equal(res.tokens[1], (np.arange(256, 264) % 260))


def test_truncate_at_stop():
    assert truncate_at_stop("a b\nc\n\nd", ["\n\n", "\n"]) == "a b"
    assert truncate_at_stop("abc", ["\n"]) == "abc"
    assert truncate_at_stop("x (a).\nQ", ["\n"]) == "x (a)."


def test_gpt2_stop_tokens_and_prefix_split(gpt2_tokenizer_dir):
    from mesh_transformer.tokenizer import get_tokenizer

    tok = get_tokenizer(str(gpt2_tokenizer_dir))
    ids = tokens_containing(tok, "\n", 50400)
    assert {198, 628} <= set(ids.tolist())
    assert all("\n" in tok.decode([i]) for i in ids)
    # a few-shot prefix ending in "\n\n" is one BPE token alone, but "\n", "\n" before "Q": the split backs off
    prefix = "Q: 1+1?\nA: 2\n\n"
    texts = [prefix + "Q: 2+2?\nA:", prefix + "Q: 3+3?\nA:"]
    pids, rows = split_shared_prefix(tok, texts, prefix)
    assert len(pids) < len(tok.encode(prefix))
    for t, r in zip(texts, rows):
        assert pids + r == tok.encode(t)


# ---------------------------------------------------------------------------------------------------------------
# logits processors
# ---------------------------------------------------------------------------------------------------------------
FILTER_SHAPE = (5, 64)
_filter = jax.jit(filter_logits)


def filt(logits, temperature, top_k, top_p):
    """filter_logits on FILTER_SHAPE rows, settings broadcast per row (one compile for all tests)."""
    b = logits.shape[0]
    per_row = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (b,))
    return np.asarray(_filter(logits.astype(np.float32), per_row(temperature, np.float32),
                              per_row(top_k, np.int32), per_row(top_p, np.float32)))


def test_top_k_keeps_exactly_k():
    logits = np.random.default_rng(0).standard_normal(FILTER_SHAPE) * 3
    ks = [1, 5, 17, 0, 63]
    out = filt(logits, 1.0, ks, 1.0)
    np.testing.assert_array_equal(np.isfinite(out).sum(-1), [1, 5, 17, 64, 63])
    for row, k in enumerate(ks):
        kept = np.flatnonzero(np.isfinite(out[row]))
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-logits[row])[:k or 64]))


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.random.default_rng(1).standard_normal(FILTER_SHAPE) * 2
    ps = np.array([0.05, 0.3, 0.5, 0.9, 0.999], np.float32)
    out = filt(logits, 0.7, 0, ps)
    z = np.exp(logits / 0.7 - (logits / 0.7).max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    for row, p in enumerate(ps):
        order = np.argsort(-probs[row])
        m = np.isfinite(out[row]).sum()
        np.testing.assert_array_equal(np.sort(np.flatnonzero(np.isfinite(out[row]))), np.sort(order[:m]))
        assert probs[row, order[:m]].sum() >= p - 1e-6
        assert probs[row, order[:m - 1]].sum() < p
        np.testing.assert_allclose(out[row, order[:m]], logits[row, order[:m]] / 0.7, rtol=1e-6)


def test_filters_match_hf_logits_processors():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = (np.random.default_rng(2).standard_normal(FILTER_SHAPE) * 2).astype(np.float32)
    for temp, k, p in [(0.7, 10, 0.8), (1.3, 0, 0.5), (1.0, 5, 1.0)]:
        scores = torch.tensor(logits)
        scores = TemperatureLogitsWarper(temp)(None, scores)
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        ours = filt(logits, temp, k, p)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores.numpy()))
        fin = np.isfinite(ours)
        np.testing.assert_allclose(ours[fin], scores.numpy()[fin], rtol=1e-6)


def test_sampling_histogram_top_k_and_greedy():
    v, n = 12, 2000
    logits = jnp.broadcast_to(jnp.log(jnp.arange(1, v + 1, dtype=jnp.float32)), (n, v))  # p ~ 1..12
    keys = jax.random.split(jax.random.key(0), n)
    sample = jax.jit(sample_tokens)
    toks = np.asarray(sample(logits, jnp.ones(n), jnp.full(n, 3, jnp.int32), jnp.ones(n), keys))
    counts = np.bincount(toks, minlength=v)
    assert set(np.flatnonzero(counts)) == {9, 10, 11}  # the 3 most likely only
    np.testing.assert_allclose(counts[9:] / n, np.array([10, 11, 12]) / 33, atol=0.03)
    # temperature 0 rows are greedy even in a sampled batch
    temps = jnp.where(jnp.arange(n) % 2 == 0, 0.0, 1.0)
    toks = np.asarray(sample(logits, temps, jnp.zeros(n, jnp.int32), jnp.ones(n), keys))
    assert (toks[::2] == v - 1).all() and len(set(toks[1::2])) > 3


# ---------------------------------------------------------------------------------------------------------------
# KV memory of a CommonsenseQA batch, from shapes only
# ---------------------------------------------------------------------------------------------------------------
def test_kv_memory_commonsenseqa_gptj(capsys):
    from mesh_transformer.config import load_config

    cfg = load_config("gptj-6b")
    gib = 2 ** 30
    per_token = kv_cache_bytes(cfg, 1, 1)
    assert per_token == 2 * 28 * 4096 * 2  # 0.46 MB per token, bf16
    shared = kv_cache_bytes(cfg, 64, 150 + 96, prefix_len=600)
    unshared = kv_cache_bytes(cfg, 64, 750 + 96)
    shared_alloc = sampler_kv_bytes(cfg, 64, 150, 96, prefix_len=600)
    unshared_alloc = sampler_kv_bytes(cfg, 64, 750, 96)
    with capsys.disabled():
        print(f"\nKV cache, GPT-J-6B bf16, 64 CommonsenseQA prompts (600 shared + 150 own + 96 new):"
              f"\n  shared prefix: {shared / gib:.2f} GiB ({shared_alloc / gib:.2f} GiB as allocated, own prompt "
              f"bucketed to {bucket_length(150)})"
              f"\n  unshared:      {unshared / gib:.2f} GiB ({unshared_alloc / gib:.2f} GiB as allocated, prompt "
              f"bucketed to {bucket_length(750)})  -> {unshared / shared:.1f}x more")
    assert unshared / shared > 3
