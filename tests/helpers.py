"""Shared test helpers: random parameters without compiling `init` (XLA's CPU compile of the truncated-normal
initializer alone takes seconds), so each test pays only for the computation it checks."""
import jax
import numpy as np

from mesh_transformer.model import CausalTransformer


def random_params(model: CausalTransformer, seed: int = 0, bias_scale: float = 0.1):
    """float32 numpy params with the model's structure: matrices ~ N(0, 1/fan_in), LN scales ~ 1 + N(0, 0.1^2),
    biases and LN offsets ~ N(0, bias_scale^2), so that every leaf matters for the logits."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    rs = np.random.RandomState(seed)
    out = {}
    for mod, leaves in shapes.items():
        stacked = mod.startswith("layers")
        out[mod] = {}
        for name, leaf in leaves.items():
            shape = leaf.shape
            noise = rs.standard_normal(shape).astype(np.float32)
            if len(shape) - stacked > 1:
                value = noise / np.sqrt(shape[-2])
            elif name == "scale":
                value = 1.0 + 0.1 * noise
            else:
                value = bias_scale * noise
            out[mod][name] = value.astype(np.float32)
    return out


def adam_mu(opt_state):
    """The first-moment tree of the (single) scale_by_adam in an optax chain state: after one step it is
    (1 - b1) * the clipped mean gradient, linear in the gradient, so it compares gradients exactly."""
    import optax
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, "expected one scale_by_adam in the optimizer chain"
    return found[0].mu


def assert_same_first_step(new, ref, new_mu, ref_mu, lr: float) -> None:
    """One optimizer step computed two ways (sharded / accumulated) vs a reference.

    The gradients (Adam's first moment) must agree to fp32 rounding. The params then agree to fp32 rounding too,
    except where the gradient is tiny: Adam's first update is lr * g / (|g| + eps), about lr * sign(g), which
    amplifies the rounding of a near-zero g up to O(lr). Those elements must be rare and have near-zero gradients."""
    def check_mu(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    jax.tree.map(check_mu, new_mu, ref_mu)

    def check(a, b, mu):
        a, b, mu = (np.asarray(x, np.float64) for x in (a, b, mu))
        diff = np.abs(a - b)
        assert diff.max() <= 2.5 * lr, f"max diff {diff.max():.3g} is more than one step of lr {lr}"
        loose = diff > 1e-6 + 1e-5 * np.abs(b)
        assert loose.mean() <= 1e-3, f"{loose.sum()} of {loose.size} elements differ beyond fp32 rounding"
        assert np.all(np.abs(mu[loose]) <= 1e-3 * np.abs(mu).max()), "a large gradient gave a different update"
    jax.tree.map(check, new, ref, ref_mu)


def left_pad(prompts, width: int, prefix_len: int = 0):
    """Prompts left-padded to `width` as the sampler lays them out: tokens [B, width] int32, valid [B, width] bool,
    positions [B, width] int32 (counted after a shared prefix of prefix_len tokens; 0 on padding)."""
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
    valid = np.arange(width)[None] >= (width - lengths)[:, None]
    positions = np.where(valid, prefix_len + np.arange(width)[None] - (width - lengths)[:, None], 0).astype(np.int32)
    return tokens, valid, positions


def hf_greedy(hf_model, rows, n_new: int) -> np.ndarray:
    """HF `generate`'s greedy continuation [B, n_new] of left-padded rows of token ids (no EOS stop): the oracle the
    sampler tests compare with."""
    import torch

    t = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), t), dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                                min_new_tokens=n_new, pad_token_id=0, eos_token_id=None)
    return out[:, t:].numpy()


def write_bpe_tokenizer(folder, texts, vocab_size: int = 400, bos: bool = False) -> None:
    """A small byte-level BPE trained on `texts` (the `tokenizers` library), saved as a model folder's tokenizer
    files (tokenizer.json, tokenizer_config.json) with EOS `<|endoftext|>`, as Qwen2.5's and Llama 3's folders ship
    theirs: every byte is encodable, so any text round-trips. bos: its template starts every text with `<s>`, as
    Llama's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<s>"] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    extra = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        extra = dict(bos_token="<s>")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra).save_pretrained(str(folder))
