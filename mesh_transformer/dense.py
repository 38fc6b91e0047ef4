"""The dense layer of every block: `hk.Linear` (same parameters, names and init), with a weight gradient that XLA's CPU
backend computes at matmul speed.

Autodiff of `x @ w` gives the weight gradient as one dot contracting the token axis of both operands,
`dot(x [N, in], g [N, out], contracting dims 0 and 0)`. XLA's CPU backend runs that transposed-operand dot through its
generic Eigen path at about half the speed of a plain matmul (12.0 ms vs 7.1 ms for [4096, 512] x [4096, 128] on one
core; torch 8.5 ms), and its simplifier folds an explicit transpose back into the dot. So on the CPU the backward
transposes the smaller of x and g behind `lax.optimization_barrier` and multiplies in the plain layout
(BENCHMARKS.md, "Training"). The values are the same sums in another order (float rounding only). On GPUs and TPUs
the libraries take transposed operands natively, so there the layer is hk.Linear's own `jnp.dot` under autodiff.
"""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def _cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w  # [..., in] x [in, out] -> [..., out]


def _fwd(x, w):
    return x @ w, (x, w)


def _bwd(res, g):
    x, w = res
    dx = (g @ w.T).astype(x.dtype)  # [..., in]
    xf = x.reshape(-1, x.shape[-1])  # [N, in]
    gf = g.reshape(-1, g.shape[-1])  # [N, out]
    if xf.shape[1] <= gf.shape[1]:  # transpose the smaller operand once, then a plain [in, N] x [N, out] matmul
        dw = jax.lax.optimization_barrier(xf.T) @ gf  # [in, out]
    else:
        # [out, N] x [N, in] -> [out, in], then transposed; the barrier keeps XLA from folding that transpose back
        # into the dot (which makes it the slow transposed-operand dot again)
        dw = jax.lax.optimization_barrier(jax.lax.optimization_barrier(gf.T) @ xf).T
    return dx, dw.astype(w.dtype)


_cpu_matmul.defvjp(_fwd, _bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out]; on the CPU with the backward above."""
    if jax.default_backend() == "cpu":
        return _cpu_matmul(x, w)
    return jnp.dot(x, w)


class Dense(hk.Linear):
    """hk.Linear whose matmul is `matmul` above: the same params (`w` [in, out], `b` [out]) and initialisers."""

    def __call__(self, inputs: jax.Array, *, precision=None) -> jax.Array:
        if not inputs.shape:
            raise ValueError("Input must not be scalar.")
        self.input_size = inputs.shape[-1]
        dtype = inputs.dtype
        w_init = self.w_init
        if w_init is None:  # hk.Linear's default
            w_init = hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(self.input_size))
        w = hk.get_parameter("w", [self.input_size, self.output_size], dtype, init=w_init)
        out = matmul(inputs, w)
        if self.with_bias:
            b = hk.get_parameter("b", [self.output_size], dtype, init=self.b_init)
            out = out + jnp.broadcast_to(b, out.shape)
        return out
