"""Training maths of mesh-transformer-jax (DESIGN section 4): gradient accumulation, the gpt3 schedule, the weight
decay mask, the loss mask, z-loss, and a tiny model that actually learns with the mtj optimizer chain."""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer import sharding
from mesh_transformer.config import load_config
from mesh_transformer.model import CausalTransformer, masked_lm_loss
from mesh_transformer.train import Trainer, decay_mask, gpt3_schedule, make_optimizer, split_batch

from helpers import adam_mu, assert_same_first_step, random_params

TINY = dict(layers=2, d_model=32, n_heads=4, n_vocab=128, seq=16, pe_rotary_dims=4, compute_dtype="float32")


def one_device_mesh():
    return sharding.make_mesh(1, devices=jax.devices()[:1])


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------------------------
def test_grad_accumulation_4xb_equals_1x4b():
    """GA=4 micro-batches of b rows == one batch of 4b rows, after one optimizer step (no loss mask: every
    micro-batch has the same token count, so the mean of means is the mean)."""
    b, t = 2, TINY["seq"]
    base = {**TINY, "warmup_steps": 0, "anneal_steps": 10, "lr": 1e-3, "end_lr": 1e-4, "weight_decay": 0.1}
    tokens = np.random.RandomState(0).randint(0, TINY["n_vocab"], (4, b, t + 1)).astype(np.int32)  # [GA, b, T+1]
    base["layers"] = 1  # depth does not matter here; one layer halves the two compiles
    params = random_params(CausalTransformer(base), seed=0)
    results = {}
    for ga, batch in [(4, tokens), (1, tokens.reshape(1, 4 * b, t + 1))]:
        cfg = load_config({**base, "gradient_accumulation_steps": ga, "per_replica_batch": 4 * b // ga})
        trainer = Trainer(cfg, one_device_mesh())
        state, metrics = trainer.train_step(trainer.state_from_params(params), {"tokens": batch})
        results[ga] = jax.device_get((state.params, adam_mu(state.opt_state), metrics))
    (p4, mu4, m4), (p1, mu1, m1) = results[4], results[1]
    for key in ("loss", "ce", "grad_norm", "tokens"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
    assert float(m1["tokens"]) == 4 * b * t
    assert np.abs(p1["layers/block/fc_in"]["w"] - params["layers/block/fc_in"]["w"]).max() > 1e-4  # it moved
    assert_same_first_step(p4, p1, mu4, mu1, lr=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# schedule and weight decay
# ---------------------------------------------------------------------------------------------------------------
def test_gpt3_schedule_formula():
    w, a, lr, end = 100, 1000, 1e-3, 1e-4
    sched = gpt3_schedule(w, a, lr, end)

    def formula(t):
        return min(max(t, 0), w) / w * lr - (lr - end) * (1 - math.cos(math.pi * min(max(t - w, 0), a) / a)) / 2

    expected = {0: 0.0, w // 2: lr / 2, w: lr, w + a // 2: (lr + end) / 2, w + a: end, 2 * (w + a): end}
    for t, value in expected.items():
        got = float(sched(t))
        assert got == pytest.approx(formula(t), rel=1e-6, abs=1e-12), t
        assert got == pytest.approx(value, rel=1e-6, abs=1e-12), t
    assert float(gpt3_schedule(0, a, lr, end)(0)) == pytest.approx(lr)  # no warm-up: full lr at once


def test_weight_decay_only_on_matrices_counted_per_layer():
    """ndim > 1 per layer: stacked [L, D] LN scales and [L, F] biases are vectors and must not be decayed."""
    model = CausalTransformer(TINY)
    params = random_params(model, seed=1)
    mask = decay_mask(params)
    decayed = {(m, n) for m, leaves in mask.items() for n, v in leaves.items() if v}
    assert decayed == {("embedding", "w"), ("layers/block/q", "w"), ("layers/block/k", "w"), ("layers/block/v", "w"),
                       ("layers/block/out", "w"), ("layers/block/fc_in", "w"), ("layers/block/fc_out", "w"),
                       ("projection/lm_head", "w")}
    assert params["layers/block/ln"]["scale"].ndim == 2 and params["layers/block/fc_in"]["b"].ndim == 2

    lr, wd = 1e-2, 0.1
    cfg = load_config({**TINY, "warmup_steps": 1, "anneal_steps": 10, "lr": lr, "end_lr": 1e-3, "weight_decay": wd})
    opt = make_optimizer(cfg)

    @jax.jit
    def two_steps(p):
        state = opt.init(p)
        zeros = jax.tree.map(jnp.zeros_like, p)
        for _ in range(2):  # step 0 has lr 0 (warm-up); step 1 has lr = lr
            updates, state = opt.update(zeros, state, p)
            p = jax.tree.map(jnp.add, p, updates)
        return p

    p = jax.device_get(two_steps(params))
    for mod, leaves in params.items():
        for name, before in leaves.items():
            after = p[mod][name]
            if mask[mod][name]:
                np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6, err_msg=f"{mod}/{name}")
                assert not np.array_equal(after, before)
            else:
                assert np.array_equal(after, before), f"{mod}/{name} was decayed"


# ---------------------------------------------------------------------------------------------------------------
# loss mask and z-loss
# ---------------------------------------------------------------------------------------------------------------
def _log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1, keepdims=True)) + m
    return x - lse, (lse - m)[..., 0]  # log-probs, logsumexp(l) - max(l)


@pytest.fixture(scope="module")
def tiny_losses():
    """Logits and losses (plain, masked, masked + z-loss) of one tiny model, from a single compile."""
    model = CausalTransformer(TINY)
    params = random_params(model, seed=2)
    rs = np.random.RandomState(2)
    tokens = rs.randint(0, TINY["n_vocab"], (3, TINY["seq"])).astype(np.int32)
    targets = rs.randint(0, TINY["n_vocab"], tokens.shape).astype(np.int32)
    mask = (rs.rand(*tokens.shape) > 0.5).astype(np.float32)

    @jax.jit
    def f(params, tokens, targets, mask):
        plain, _ = model.loss(params, tokens, targets)
        masked, aux = model.loss(params, tokens, targets, mask)
        with_z, aux_z = model.loss(params, tokens, targets, mask, z_loss=True)
        return model.logits(params, tokens), plain, masked, aux, with_z, aux_z

    out = jax.device_get(f(params, tokens, targets, mask))
    return dict(model=model, targets=targets, mask=mask, out=out)


def test_loss_mask_counts_only_unmasked_positions(tiny_losses):
    logits, plain, masked, aux, _, _ = tiny_losses["out"]
    targets, mask = tiny_losses["targets"], tiny_losses["mask"]
    logp, _ = _log_softmax64(logits)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]  # [B, T]
    keep = mask.astype(bool)
    assert 0 < keep.sum() < keep.size
    np.testing.assert_allclose(masked, nll[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["ce"], nll[keep].mean(), rtol=1e-5)
    assert float(aux["tokens"]) == keep.sum()
    np.testing.assert_allclose(plain, nll.mean(), rtol=1e-5)

    # masked positions get no gradient, and their targets do not matter
    grad = jax.grad(lambda l: masked_lm_loss(l, targets, mask, 1e-4)[0])(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[~keep] == 0) and np.abs(np.asarray(grad)[keep]).max() > 0
    other = np.where(keep, targets, (targets + 7) % TINY["n_vocab"])
    assert float(masked_lm_loss(jnp.asarray(logits), other, mask, 1e-4)[0]) == pytest.approx(
        float(masked_lm_loss(jnp.asarray(logits), targets, mask, 1e-4)[0]), rel=1e-6)


def test_z_loss_formula(tiny_losses):
    logits, _, masked, _, with_z, aux_z = tiny_losses["out"]
    mask = tiny_losses["mask"].astype(bool)
    _, log_z = _log_softmax64(logits)
    assert tiny_losses["model"].config.z_loss == 1e-4
    np.testing.assert_allclose(aux_z["ce"], masked, rtol=1e-6)  # ce is reported without the z term
    np.testing.assert_allclose(with_z, masked + 1e-4 * np.mean(log_z[mask] ** 2), rtol=1e-6)
    # unmasked, on arbitrary logits: 1e-4 * mean((logsumexp - max)^2)
    rs = np.random.RandomState(5)
    logits2 = (rs.standard_normal((2, 5, 11)) * 3).astype(np.float32)
    targets2 = rs.randint(0, 11, (2, 5))
    loss, aux2 = masked_lm_loss(jnp.asarray(logits2), jnp.asarray(targets2), None, 1e-4)
    logp2, log_z2 = _log_softmax64(logits2)
    ce2 = -np.take_along_axis(logp2, targets2[..., None], -1).mean()
    np.testing.assert_allclose(aux2["ce"], ce2, rtol=1e-5)
    np.testing.assert_allclose(loss, ce2 + 1e-4 * np.mean(log_z2 ** 2), rtol=1e-6)
    # with a large coefficient the z term itself is checked to fp32 precision
    loss_big, _ = masked_lm_loss(jnp.asarray(logits2), jnp.asarray(targets2), None, 1.0)
    np.testing.assert_allclose(float(loss_big) - ce2, np.mean(log_z2 ** 2), rtol=1e-5)


def test_split_batch_aligns_mask_with_targets():
    tokens = np.arange(2 * 6).reshape(1, 2, 6)
    mask = np.array([[[0, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]]])
    inputs, targets, m = split_batch({"tokens": tokens, "loss_mask": mask})
    assert np.array_equal(inputs, tokens[..., :-1]) and np.array_equal(targets, tokens[..., 1:])
    assert np.array_equal(m, mask[..., 1:])  # the mask of a target token, not of the input
    _, _, ones = split_batch({"tokens": tokens, "loss_mask": mask}, use_mask=False)
    assert np.all(np.asarray(ones) == 1)


# ---------------------------------------------------------------------------------------------------------------
# it learns
# ---------------------------------------------------------------------------------------------------------------
def test_tiny_model_loss_falls_on_repeating_corpus():
    """A repeated random 32-token sequence (vocab 64): the mtj chain (warm-up 10 to lr 3e-3, cosine to 3e-4 over
    200, wd 0.1, clip 1, z-loss) halves the loss well within a CPU minute."""
    cfg = load_config(dict(layers=2, d_model=64, n_heads=4, n_vocab=64, seq=32, pe_rotary_dims=8,
                           compute_dtype="float32", per_replica_batch=8, warmup_steps=10, anneal_steps=200,
                           lr=3e-3, end_lr=3e-4, weight_decay=0.1, total_steps=60))
    rs = np.random.RandomState(0)
    cycle = rs.randint(0, 64, 32)
    stream = np.tile(cycle, 8)
    trainer = Trainer(cfg, one_device_mesh())
    state = trainer.init_state(jax.random.PRNGKey(0))
    losses = []
    start = time.time()
    for step in range(cfg.total_steps):
        offsets = rs.randint(0, 32, 8)
        batch = np.stack([stream[o:o + cfg.seq + 1] for o in offsets])[None].astype(np.int32)  # [1, 8, 33]
        state, metrics = trainer.train_step(state, {"tokens": batch})
        losses.append(float(metrics["ce"]))
    elapsed = time.time() - start
    print(f"\nloss fall: ce {losses[0]:.3f} -> {losses[-1]:.3f} (min {min(losses):.3f}) in {len(losses)} steps, "
          f"{elapsed:.1f}s incl. compile; ln(64) = {math.log(64):.3f}")
    assert abs(losses[0] - math.log(64)) < 1.0  # starts near uniform (mtj init: logit std ~0.9)
    assert losses[-1] < losses[0] / 2
    assert int(state.step) == cfg.total_steps
