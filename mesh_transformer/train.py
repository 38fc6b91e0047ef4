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
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import sharding
from .config import Config
from .model import CausalTransformer


def gpt3_schedule(warmup_steps: int, anneal_steps, lr: float, end_lr: float):
    """Linear warm-up to `lr` over W steps, then a half-cosine down to `end_lr` over A steps; the first step is 0.

    A may be a traced scalar: the train step takes the horizon as data, so one compiled step serves every
    fine-tune length. The cosine's argument is written `clip(t - W, 0, A) * (pi * (1 / A))` in float32, which is
    what XLA's constant folding makes of `pi * (clip(t - W, 0, A) / A)` for a constant A: the traced form gives
    the same bits as the constant one, so runs are identical to those of a schedule compiled per horizon."""
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.clip(step, 0, warmup_steps) / warmup_steps if warmup_steps > 0 else jnp.ones_like(step)
        a = jnp.asarray(anneal_steps, jnp.float32)
        angle = jnp.clip(step - warmup_steps, 0, a) * (jnp.float32(math.pi) * (1.0 / a))
        return warmup * lr - (lr - end_lr) * (1 - jnp.cos(angle)) / 2
    return schedule


def decay_mask(params: Any) -> Any:
    """mtj decays only leaves with ndim > 1 (matrices), counted per layer: stacked layer leaves lose their [L]."""
    return {mod: {name: (leaf.ndim - (1 if sharding.is_stacked(mod) else 0)) > 1 for name, leaf in leaves.items()}
            for mod, leaves in params.items()}


def make_optimizer(cfg: Config, anneal_steps=None) -> optax.GradientTransformation:
    """mtj's chain. anneal_steps (default the config's) may be a traced scalar: the state's structure does not
    depend on it, so checkpoints are the same whatever horizon a fine-tune used."""
    anneal = cfg.anneal_steps if anneal_steps is None else anneal_steps
    return optax.chain(
        optax.scale(1.0 / cfg.gradient_accumulation_steps),
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, mu_dtype=_ADAM_DTYPES[cfg.adam_dtype]),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale(-1.0),
        optax.scale_by_schedule(gpt3_schedule(cfg.warmup_steps, anneal, cfg.lr, cfg.end_lr)),
    )


_ADAM_DTYPES = {"params": None, "bfloat16": jnp.bfloat16}  # None: the params' dtype (optax's default)


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
    """Holds the model, optimizer and mesh; builds the sharded, jitted init, train and eval steps once.

    State is born sharded: `init_state` runs the model's init and `optimizer.init` inside one `jax.jit` whose
    out_shardings are the Megatron layout (MaxText's pattern), and `state_from_params` places given params leaf by
    leaf on their shardings before a jitted `optimizer.init` creates the moments in place. No leaf ever exists
    whole on one device (at 6B: 24 GB of fp32 params and 48 GB of moments, on 16 GB cores). With `zero: true` in
    the config the stored params and moments are also split over 'dp' (ZeRO): the step casts them to the compute
    dtype and gathers that copy for the forward, and reduce-scatters the gradients back to the stored layout, so
    each device keeps 1/(dp*mp) of the state instead of 1/mp.

    train_step(state, batch, anneal_steps=None) with batch tokens [GA, B, T+1] (B = dp * per_replica_batch)
    returns (state, {"loss", "ce", "grad_norm", "lr", "tokens"}); the schedule's horizon is an argument (data), so
    fine-tunes of different lengths share one compiled step. eval_step(params, batch [B, T+1]) -> {"loss", "ce"}.
    """

    def __init__(self, cfg: Config, mesh: Optional[Mesh] = None):
        self.cfg = cfg
        self.model = CausalTransformer(cfg)
        self.optimizer = make_optimizer(cfg)
        self.schedule = gpt3_schedule(cfg.warmup_steps, cfg.anneal_steps, cfg.lr, cfg.end_lr)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.cores_per_replica)
        self.use_mask = cfg.loss_mask != "none"
        # abstract shapes only: nothing is allocated to learn the layout
        self.param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, self.param_dtype),
                                         jax.eval_shape(self.model.init, jax.random.PRNGKey(0)))
        # compute_specs: the Megatron layout the forward pass runs in. param_specs: where the fp32 master params
        # (and, from them, the optimizer state) are stored; the same, or with cfg.zero also split over 'dp'.
        self.compute_specs = sharding.param_specs(self.param_shapes, sharding.replicate_kv(cfg, self.mesh))
        self.compute_shardings = sharding.named(self.mesh, self.compute_specs)
        self.zero = bool(cfg.zero) and self.mesh.shape[sharding.DP] > 1
        self.param_specs = (sharding.zero_specs(self.compute_specs, self.param_shapes, self.mesh.shape[sharding.DP])
                            if self.zero else self.compute_specs)
        self.param_shardings = sharding.named(self.mesh, self.param_specs)
        opt_shapes = jax.eval_shape(self.optimizer.init, self.param_shapes)
        opt_specs = sharding.tree_specs_like_params(opt_shapes, self.param_shapes, self.param_specs)
        self.shardings = TrainState(self.param_shardings, sharding.named(self.mesh, opt_specs),
                                    NamedSharding(self.mesh, P()))
        self._init = jax.jit(self._init_fn, out_shardings=self.shardings)
        self._init_params = jax.jit(lambda rng: self._init_fn(rng).params, out_shardings=self.param_shardings)
        self._opt_init = jax.jit(self.optimizer.init, in_shardings=(self.param_shardings,),
                                 out_shardings=self.shardings.opt_state)
        # a copy, never the caller's buffers: the train step donates its state
        self._cast = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(x).astype(self.param_dtype), p),
                             in_shardings=(self.param_shardings,), out_shardings=self.param_shardings)
        self._train_step = jax.jit(self._train_step_fn,
                                   in_shardings=(self.shardings, self.batch_sharding(3), NamedSharding(self.mesh, P())),
                                   out_shardings=(self.shardings, None), donate_argnums=(0,))
        self._eval_step = jax.jit(self._eval_step_fn, in_shardings=(self.param_shardings, self.batch_sharding(2)))

    @property
    def param_dtype(self):
        return jnp.bfloat16 if self.cfg.early_cast else jnp.float32

    # ------------------------------------------------------------------ state and shardings
    def state_shardings(self, state: Optional[TrainState] = None) -> TrainState:
        """NamedShardings of the TrainState (params, opt_state, step); the same for every state of this trainer."""
        return self.shardings

    def _init_fn(self, rng):
        params = jax.tree.map(lambda x: x.astype(self.param_dtype), self.model.init(rng))
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32))

    def init_state(self, rng: jax.Array) -> TrainState:
        """A fresh TrainState, created on the mesh in its shardings (one jitted init of params and moments)."""
        return self._init(rng)

    def init_params(self, rng: jax.Array) -> Any:
        """Freshly initialised params alone, created on the mesh in their shardings."""
        return self._init_params(rng)

    def put_params(self, params: Any) -> Any:
        """Params (host numpy or device arrays) on the mesh in the storage dtype, leaf by leaf: a host leaf goes
        straight to its shards; device leaves are resharded where needed and then copied (cast) under jit, so the
        result never shares buffers with the caller's arrays."""
        on_device = any(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
        placed = sharding.place(params, self.param_shardings, host_dtype=self.param_dtype)
        return self._cast(placed) if on_device else placed

    def state_from_params(self, params: Any, opt_state: Any = None, step: int = 0) -> TrainState:
        """A sharded TrainState from host or device params (a fresh optimizer state unless one is given).

        The params are placed (or copied, for device arrays the caller keeps, e.g. a STaR base model) on their
        shardings; a fresh optimizer state is made by the jitted `optimizer.init` with the state's out_shardings;
        a given one (host arrays from a checkpoint) goes leaf by leaf to its shardings."""
        params = self.put_params(params)
        if opt_state is None:
            opt_state = self._opt_init(params)
        else:
            opt_state = sharding.place(opt_state, self.shardings.opt_state)
        return TrainState(params, opt_state, jax.device_put(jnp.asarray(step, jnp.int32), self.shardings.step))


    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, sharding.batch_spec(ndim))

    # ------------------------------------------------------------------ steps
    def _loss(self, params, inputs, targets, mask, z_loss):
        return self.model.loss(params, inputs, targets, mask, z_loss=z_loss)

    def _train_step_fn(self, state: TrainState, batch: dict, anneal_steps):
        inputs, targets, mask = split_batch(batch, self.use_mask)  # [GA, B, T]
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        # Gradients are taken w.r.t. the compute-dtype copy of the params, made once per step: a bf16 micro-batch
        # gradient holds exactly the values the fp32 one did (the cotangent of a cast to bf16 is bf16), in half
        # the bytes; they are summed in float32.
        compute_params = self._for_compute(state.params)

        def f32(tree):
            return jax.tree.map(lambda g: g.astype(jnp.float32), tree)

        def micro(carry, xs):
            grads, loss_sum, ce_sum, tok_sum = carry
            (loss, aux), g = grad_fn(compute_params, *xs, True)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, self._as_stored(g))
            return (grads, loss_sum + loss, ce_sum + aux["ce"], tok_sum + aux["tokens"]), None

        ga = inputs.shape[0]
        if ga == 1:  # no accumulator: at 6B on one device the fp32 sum alone is 24 GB
            (loss_sum, aux), grads = grad_fn(compute_params, inputs[0], targets[0], mask[0], True)
            grads, ce_sum, tokens = f32(self._as_stored(grads)), aux["ce"], aux["tokens"]
        else:
            zeros = self._as_stored(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
            (grads, loss_sum, ce_sum, tokens), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, 0.0),
                                                                (inputs, targets, mask))
        grad_norm = optax.global_norm(grads) / ga  # norm of the mean gradient, before clipping
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        optimizer = make_optimizer(self.cfg, anneal_steps)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        schedule = gpt3_schedule(self.cfg.warmup_steps, anneal_steps, self.cfg.lr, self.cfg.end_lr)
        metrics = {"loss": loss_sum / ga, "ce": ce_sum / ga, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "tokens": tokens}
        return TrainState(params, opt_state, state.step + 1), metrics

    def _for_compute(self, params):
        """The compute-dtype copy of the params in the compute layout: with ZeRO, the dp-split masters are cast
        first and then gathered, so the all-gather moves bf16, not fp32."""
        compute = self.model.cast_for_compute(params)
        if self.zero:
            compute = jax.lax.with_sharding_constraint(compute, self.compute_shardings)
        return compute

    def _as_stored(self, grads):
        """Gradients in the params' storage layout: with ZeRO, split over dp (XLA turns the data-parallel
        all-reduce and the slice into a reduce-scatter), so the sum, the clip and Adam run on 1/dp of each leaf."""
        if not self.zero:
            return grads
        return jax.lax.with_sharding_constraint(grads, self.param_shardings)

    def train_step(self, state: TrainState, batch: dict, anneal_steps: Optional[int] = None):
        """One optimizer step (asynchronous: the metrics are device scalars; read them when you need them).
        anneal_steps: the schedule's horizon (default the config's anneal_steps)."""
        anneal = self.cfg.anneal_steps if anneal_steps is None else anneal_steps
        return self._train_step(state, batch, np.asarray(anneal, np.int32))

    def lower_train_step(self, batch_shape: tuple) -> Any:
        """The train step lowered on abstract shapes (nothing allocated), for memory analysis and AOT compiles.
        batch_shape: (GA, B, T+1)."""
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             self.abstract_state(), self.shardings)
        batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=self.batch_sharding(3))
                 for k in (("tokens", "loss_mask") if self.use_mask else ("tokens",))}
        return self._train_step.lower(state, batch, jax.ShapeDtypeStruct((), jnp.int32))

    def abstract_state(self) -> TrainState:
        """Shapes and dtypes of the TrainState, from eval_shape."""
        return jax.eval_shape(self._init_fn, jax.random.PRNGKey(0))

    def _eval_step_fn(self, params, batch: dict):
        inputs, targets, mask = split_batch(batch, self.use_mask)
        if self.zero:
            params = self._for_compute(params)
        loss, aux = self._loss(params, inputs, targets, mask, False)
        return {"loss": loss, "ce": aux["ce"], "tokens": aux["tokens"]}

    def eval_step(self, params: Any, batch: dict):
        """Loss without z-loss on tokens [B, T+1]."""
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
