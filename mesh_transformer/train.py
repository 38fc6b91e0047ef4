"""Optimizer, learning-rate schedule and the jitted train / eval steps of mesh-transformer-jax.

The chain and schedule are mtj's (`device_train.py`, `mesh_transformer/util.py`):
  chain(scale(1/GA), clip_by_global_norm(1), scale_by_adam(0.9, 0.999, 1e-8), add_decayed_weights(wd, ndim>1),
        scale(-1), scale_by_schedule(gpt3_schedule))
Gradients of the GA micro-batches are summed in a `lax.scan` and the chain divides by GA, so one step sees the mean.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import sharding
from .config import Config
from .model import CausalTransformer


def gpt3_schedule(warmup_steps: int, anneal_steps: int, lr: float, end_lr: float):
    """Linear warm-up to `lr` over W steps, then a half-cosine down to `end_lr` over A steps; the first step is 0."""
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.clip(step, 0, warmup_steps) / warmup_steps if warmup_steps > 0 else jnp.ones_like(step)
        anneal = jnp.clip(step - warmup_steps, 0, anneal_steps) / anneal_steps
        return warmup * lr - (lr - end_lr) * (1 - jnp.cos(jnp.pi * anneal)) / 2
    return schedule


def decay_mask(params: Any) -> Any:
    """mtj decays only leaves with ndim > 1 (matrices), counted per layer: stacked layer leaves lose their [L]."""
    return {mod: {name: (leaf.ndim - (1 if sharding.is_stacked(mod) else 0)) > 1 for name, leaf in leaves.items()}
            for mod, leaves in params.items()}


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    return optax.chain(
        optax.scale(1.0 / cfg.gradient_accumulation_steps),
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale(-1.0),
        optax.scale_by_schedule(gpt3_schedule(cfg.warmup_steps, cfg.anneal_steps, cfg.lr, cfg.end_lr)),
    )


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken


def split_batch(batch: dict, use_mask: bool = True):
    """{"tokens": [..., T+1], "loss_mask": [..., T+1]} -> inputs, targets, mask (each [..., T])."""
    tokens = batch["tokens"]
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    mask = batch.get("loss_mask") if use_mask else None
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[..., 1:].astype(jnp.float32)
    return inputs, targets, mask


class Trainer:
    """Holds the model, optimizer and mesh; builds sharded, jitted train and eval steps.

    train_step(state, batch) with batch tokens [GA, B, T+1] (B = dp * per_replica_batch) returns
    (state, {"loss", "ce", "grad_norm", "lr", "tokens"}). eval_step(params, batch [B, T+1]) returns {"loss", "ce"}.
    """

    def __init__(self, cfg: Config, mesh: Optional[Mesh] = None):
        self.cfg = cfg
        self.model = CausalTransformer(cfg)
        self.optimizer = make_optimizer(cfg)
        self.schedule = gpt3_schedule(cfg.warmup_steps, cfg.anneal_steps, cfg.lr, cfg.end_lr)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.cores_per_replica)
        self.use_mask = cfg.loss_mask != "none"
        self._train_step = None
        self._eval_step = None

    # ------------------------------------------------------------------ state and shardings
    def state_shardings(self, state: TrainState) -> TrainState:
        specs = sharding.param_specs(state.params)
        opt_specs = sharding.tree_specs_like_params(state.opt_state, state.params, specs)
        return TrainState(*sharding.named(self.mesh, (specs, opt_specs, P())))

    def init_state(self, rng: jax.Array) -> TrainState:
        params = jax.jit(self.model.init)(rng)
        return self.state_from_params(params)

    def state_from_params(self, params: Any, opt_state: Any = None, step: int = 0) -> TrainState:
        """A sharded TrainState from host or device params (fresh optimizer state unless one is given)."""
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16 if self.cfg.early_cast else jnp.float32), params)
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        state = TrainState(params, opt_state, jnp.asarray(step, jnp.int32))
        return jax.device_put(state, self.state_shardings(state))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, sharding.batch_spec(ndim))

    # ------------------------------------------------------------------ steps
    def _loss(self, params, inputs, targets, mask, z_loss):
        return self.model.loss(params, inputs, targets, mask, z_loss=z_loss)

    def _train_step_fn(self, state: TrainState, batch: dict):
        inputs, targets, mask = split_batch(batch, self.use_mask)  # [GA, B, T]
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def micro(carry, xs):
            grads, loss_sum, ce_sum, tok_sum = carry
            (loss, aux), g = grad_fn(state.params, *xs, True)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, loss_sum + loss, ce_sum + aux["ce"], tok_sum + aux["tokens"]), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, loss_sum, ce_sum, tokens), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, 0.0), (inputs, targets, mask))
        ga = inputs.shape[0]
        grad_norm = optax.global_norm(grads) / ga  # norm of the mean gradient, before clipping
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / ga, "ce": ce_sum / ga, "grad_norm": grad_norm,
                   "lr": self.schedule(state.step), "tokens": tokens}
        return TrainState(params, opt_state, state.step + 1), metrics

    def train_step(self, state: TrainState, batch: dict):
        if self._train_step is None:
            shardings = self.state_shardings(state)
            batch_shardings = {k: self.batch_sharding(3) for k in batch}
            self._train_step = jax.jit(self._train_step_fn, in_shardings=(shardings, batch_shardings),
                                       out_shardings=(shardings, None), donate_argnums=(0,))
        return self._train_step(state, batch)

    def _eval_step_fn(self, params, batch: dict):
        inputs, targets, mask = split_batch(batch, self.use_mask)
        loss, aux = self._loss(params, inputs, targets, mask, False)
        return {"loss": loss, "ce": aux["ce"], "tokens": aux["tokens"]}

    def eval_step(self, params: Any, batch: dict):
        """Loss without z-loss on tokens [B, T+1]."""
        if self._eval_step is None:
            specs = sharding.named(self.mesh, sharding.param_specs(params))
            self._eval_step = jax.jit(self._eval_step_fn,
                                      in_shardings=(specs, {k: self.batch_sharding(2) for k in batch}))
        return self._eval_step(params, batch)


def flops_per_token(cfg: Config, seq: Optional[int] = None) -> float:
    """Training FLOPs per token, PaLM's 6N + 12 L d T (attention counted at full length)."""
    t = seq or cfg.seq
    return 6 * cfg.n_params + 12 * cfg.layers * cfg.d_model * t


def mfu(cfg: Config, tokens_per_second: float, peak_flops: Optional[float], seq: Optional[int] = None) -> float:
    """Model FLOPs utilisation; NaN when the peak of the device is unknown (CPU)."""
    if not peak_flops:
        return math.nan
    return flops_per_token(cfg, seq) * tokens_per_second / peak_flops


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v3": 123e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12}


def device_peak_flops() -> Optional[float]:
    """Dense bf16 peak of all local devices together, from the device kind (None when unknown, e.g. CPU)."""
    devices = jax.local_devices()
    kind = devices[0].device_kind
    for name, peak in _PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak * len(devices)
    return None
