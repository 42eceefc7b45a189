"""Building blocks: weight declaration with logical axes, RMSNorm, dense MLP.

Every weight is declared once, here or in a layer's `__init__`, through `param(...)`: shape, dtype and the
*logical* axis names (see `model/__init__.py` for the glossary). Shardings are derived from those names by the
rule sets in `sharding/` — layers never mention mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.formats import QuantizedTensor


class Buffer(nnx.Variable):
    """A non-trainable model array (e.g. the router's `e_score_correction_bias`); optimizers skip it."""


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, *,
          init: str = "normal", std: float = 0.02, kind=nnx.Param) -> nnx.Variable:
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    if init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return kind(value, axes=tuple(axes))


def matmul(x_MK: jax.Array, w_KN) -> jax.Array:
    """``x[..., K] @ w[K, N]`` for a plain weight or an FP4 `QuantizedTensor` (packed; `fp4_matmul`)."""
    if isinstance(w_KN, QuantizedTensor):
        from pallas_kernels.fp4_matmul import fp4_matmul

        return fp4_matmul(x_MK, w_KN)
    return jnp.einsum("...k,kn->...n", x_MK, w_KN)


def grouped_matmul(x_MK: jax.Array, w_EKN, group_sizes_E: jax.Array) -> jax.Array:
    """``lax.ragged_dot(x, w, group_sizes)`` (rows sorted by expert) for a plain [E, K, N] weight or an FP4
    `QuantizedTensor` (`fp4_grouped_matmul`, same semantics). Layers call this and never branch on dtype."""
    if isinstance(w_EKN, QuantizedTensor):
        from pallas_kernels.fp4_matmul import fp4_grouped_matmul

        return fp4_grouped_matmul(x_MK, w_EKN, group_sizes_E)
    return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to the input dtype before the weight (as the HF reference)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, axis: str, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis,), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class MLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, axis: str = "mlp"):
        self.gate_proj = param(rngs, (dim, hidden), ("embed", axis), dtype)
        self.up_proj = param(rngs, (dim, hidden), ("embed", axis), dtype)
        self.down_proj = param(rngs, (hidden, dim), (axis, "embed"), dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        # get_value(): a weight is an array or, in a quantized model, an FP4 QuantizedTensor (see `matmul`).
        g_BTF = matmul(x_BTD, self.gate_proj.get_value())
        u_BTF = matmul(x_BTD, self.up_proj.get_value())
        return matmul(jax.nn.silu(g_BTF) * u_BTF, self.down_proj.get_value())
