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


def assert_adam_step_close(new, ref, lr: float) -> None:
    """Params after one Adam step, computed two ways (sharded / accumulated) vs a reference.

    Adam's first update is lr * g / (|g| + eps), about lr * sign(g), so where |g| is tiny the fp32 rounding of g
    (reduction order) is amplified up to a few percent of lr. We demand: every element within 5% of lr, and all but
    0.1% of elements within fp32 rounding (1e-6 abs + 1e-5 rel)."""
    def check(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = np.abs(a - b)
        assert diff.max() <= 0.05 * lr, f"max diff {diff.max():.3g} > 5% of lr {lr}"
        loose = diff > 1e-6 + 1e-5 * np.abs(b)
        assert loose.mean() <= 1e-3, f"{loose.sum()} of {loose.size} elements differ beyond fp32 rounding"
    jax.tree.map(check, new, ref)
