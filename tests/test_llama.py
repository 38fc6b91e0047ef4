"""The Llama family (Llama with GQA and Llama-3 rope scaling, Qwen2 with q/k/v bias and tied embeddings, Mistral with a
sliding window shorter than the sequence) against HF transformers on tiny random models: logits parity in fp32,
save_hf -> from_pretrained, load -> save -> load bit-exact (single file and sharded index, fp32 and bf16), greedy
tokens == HF generate for mixed-length prompts with and without a shared prefix, decode steps == full forward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mesh_transformer.hf import load_hf, save_hf  # noqa: E402
from mesh_transformer.model import CausalTransformer  # noqa: E402
from mesh_transformer.sampling import Sampler, decode_step, prefill  # noqa: E402

from helpers import hf_greedy, left_pad  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16)),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=4, tie_word_embeddings=True,
                                              rope_theta=1000000.0),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=5, head_dim=8),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
PROMPTS = [[5, 17, 99], [200, 3, 3, 8, 41, 77, 120, 250, 9, 30, 64], [7, 8, 9, 10, 11, 12, 13], [11, 12, 13, 14]]
PREFIX = [40, 41, 42, 43, 44, 45]
N_NEW = 8


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its fp32 folder, our config, params) for each family."""
    name = request.param
    torch.manual_seed(0)
    hf = getattr(transformers, CLASSES[name])(FAMILIES[name]()).eval()
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(str(folder))
    cfg, params = load_hf(str(folder))
    return name, hf, folder, cfg, params


def test_config_and_logits_match_hf(family):
    name, hf, folder, cfg, params = family
    assert cfg.model_type == name and cfg.compute_dtype == "float32"  # the folder's dtype
    assert cfg.kv_heads == hf.config.num_key_value_heads
    assert cfg.qkv_bias == (name == "qwen2") and cfg.tie_word_embeddings == (name == "qwen2")
    assert (cfg.rope_scaling is not None) == (name == "llama") and cfg.sliding_window == (5 if name == "mistral" else None)
    ids = np.random.default_rng(0).integers(0, 256, (2, 24))  # 24 tokens > the sliding window and rope's 16
    ref = hf_logits(hf, ids)
    got = np.asarray(CausalTransformer(cfg).logits(params, jnp.asarray(ids)))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_save_hf_from_pretrained_and_bit_exact_round_trips(family, tmp_path):
    name, hf, folder, cfg, params = family
    ids = np.random.default_rng(1).integers(0, 256, (1, 12))
    ref = hf_logits(hf, ids)
    for sharded in (None, 20_000):  # one file; a model.safetensors.index.json over several
        out = tmp_path / f"out{sharded}"
        save_hf(cfg, params, str(out), max_shard_bytes=sharded, eos_token_id=2, bos_token_id=1)
        if sharded:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1
        again = getattr(transformers, CLASSES[name]).from_pretrained(str(out), dtype=torch.float32).eval()
        np.testing.assert_array_equal(hf_logits(again, ids), ref)
        cfg2, params2 = load_hf(str(out))
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)
    # bf16: load -> save -> load keeps every bit, and the bf16 folder computes in bf16
    save_hf(cfg, params, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_bytes=20_000)
    cfg3, p3 = load_hf(str(tmp_path / "bf16"))
    assert cfg3.compute_dtype == "bfloat16"
    save_hf(cfg3, p3, str(tmp_path / "bf16b"), dtype="bfloat16", max_shard_bytes=20_000)
    _, p4 = load_hf(str(tmp_path / "bf16b"))
    jax.tree.map(np.testing.assert_array_equal, p4, p3)


def test_greedy_matches_hf_generate_with_and_without_prefix(family):
    name, hf, folder, cfg, params = family
    sampler = Sampler(CausalTransformer(cfg), params)
    plain = sampler.sample(PROMPTS, N_NEW)
    np.testing.assert_array_equal(plain.tokens, hf_greedy(hf, PROMPTS, N_NEW))
    shared = sampler.sample(PROMPTS, N_NEW, prefix=PREFIX)
    np.testing.assert_array_equal(shared.tokens, hf_greedy(hf, [PREFIX + p for p in PROMPTS], N_NEW))


def test_decode_steps_match_full_forward(family):
    """prefill + decode_step (GQA cache, shared prefix, sliding window) teacher-forced == one full forward."""
    name, hf, folder, cfg, params = family
    model = CausalTransformer(cfg)
    rng = np.random.default_rng(0)
    prompts = [p[:n] for p, n in zip(PROMPTS, (3, 7, 1, 4))]
    follow = rng.integers(0, 256, (len(prompts), 6)).astype(np.int32)
    p_len, tp, b = len(PREFIX), 8, len(prompts)
    toks, valid, positions = left_pad(prompts, tp, p_len)
    plen = np.array([len(p) for p in prompts])
    pkv, _ = jax.jit(model.prefix_kv)(params, jnp.asarray([PREFIX], jnp.int32))
    assert pkv.k.shape == (cfg.layers, cfg.kv_heads, p_len, cfg.d_head)
    logits, cache = jax.jit(lambda p, t, pos, val, pk: prefill(model, p, t, pos, val, tp + 6, pk))(
        params, toks, positions, valid, pkv)
    assert cache.k.shape == (cfg.layers, b, cfg.kv_heads, tp + 6, cfg.d_head)
    step = jax.jit(lambda p, c, t, pos, s, pk: decode_step(model, p, c, t, pos, s, pk))
    got = [np.asarray(logits)]
    for j in range(follow.shape[1]):
        logits, cache = step(params, cache, follow[:, j], p_len + plen + j, tp + j, pkv)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    for i, p in enumerate(prompts):
        row = PREFIX + p + list(follow[i])
        ref = np.asarray(model.logits(params, jnp.asarray([row])))[0]
        start = p_len + len(p) - 1
        want = ref[start:start + follow.shape[1] + 1]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_prompts_start_with_the_tokenizers_bos_as_hf(tmp_path):
    """A tokenizer whose template starts texts with BOS (Llama 2/3, Mistral): the sampler's text API and the STaR
    packer put it first, so greedy completions equal HF `generate` on `tokenizer(texts)` (which adds it), with and
    without a shared prefix; a tokenizer without BOS (Qwen2, GPT-2, byte) adds nothing."""
    from helpers import write_bpe_tokenizer
    from mesh_transformer.tokenizer import get_tokenizer
    from star.backend import pack_examples

    folder = tmp_path / "llama"
    texts = ["Q: what is two plus three?\nA: five.\n", "Q: name a colour.\nA: blue.\n"] * 30
    write_bpe_tokenizer(folder, texts, vocab_size=300, bos=True)
    write_bpe_tokenizer(tmp_path / "plain", texts, vocab_size=300)
    assert get_tokenizer(str(tmp_path / "plain")).bos_token_id is None
    tok = get_tokenizer(str(folder))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.bos_token_id == hf_tok.convert_tokens_to_ids("<s>")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": 320},
                                                                 num_key_value_heads=2)).eval()
    hf.save_pretrained(str(folder))
    cfg, params = load_hf(str(folder))
    sampler = Sampler(CausalTransformer(cfg), params)
    prefix = "Q: what is two plus three?\nA: five.\n"
    prompts = [prefix + "Q: name a colour.\nA:", prefix + "Q: what is one plus one?\nA:"]
    ref = [hf_tok.decode(row) for row in hf_greedy(hf, [hf_tok(p)["input_ids"] for p in prompts], N_NEW)]
    assert all(hf_tok(p)["input_ids"][0] == tok.bos_token_id for p in prompts)
    for shared in (None, prefix):
        got = sampler.generate(prompts, tok, N_NEW, stop=(), shared_prefix=shared)
        assert got == ref, (shared, got, ref)
    # STaR's training rows: each example starts with BOS, which (as context) is not learned
    from tfrecord_utils.records import parse_token_example, read_tfrecord
    pack_examples([("Q: a?\nA:", " b.")] * 40, tok, 15, str(tmp_path / "records"), "train")
    ctx, comp = tok.encode("Q: a?\nA:"), tok.encode(" b.")
    example = [tok.bos_token_id] + ctx + comp + [tok.eos_token_id]
    record = next(iter(sorted((tmp_path / "records").glob("*.tfrecords"))))
    tokens, mask = parse_token_example(next(read_tfrecord(record)))
    assert list(tokens[:len(example)]) == example
    assert list(mask[:len(example)]) == [0] * (1 + len(ctx)) + [1] * (len(comp) + 1)
