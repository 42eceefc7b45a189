"""Building blocks: weight declaration with logical axes, RMSNorm, dense MLP.

Every weight is declared once, here or in a layer's `__init__`, through `param(...)`: shape, dtype and the
*logical* axis names (see `model/__init__.py` for the glossary). Shardings are derived from those names by the
rule sets in `sharding/` — layers never mention mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec

from pallas_kernels.formats import QuantizedTensor
from pallas_kernels.fp4_matmul import fp4_batched_matmul, fp4_grouped_matmul, fp4_matmul


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


def matmul(x_MK: jax.Array, w_KN, impl: str = "xla") -> jax.Array:
    """``x[..., K] @ w[K, N]`` for a plain weight or a quantized `QuantizedTensor` (packed; `fp4_matmul` with
    `impl`, see `model.runtime.Runtime.matmul_impl`)."""
    if isinstance(w_KN, QuantizedTensor):
        return fp4_matmul(x_MK, w_KN, impl=impl)
    return jnp.einsum("...k,kn->...n", x_MK, w_KN)


def grouped_matmul(x_MK: jax.Array, w_EKN, group_sizes_E: jax.Array, impl: str = "xla") -> jax.Array:
    """``lax.ragged_dot(x, w, group_sizes)`` (rows sorted by expert) for a plain [E, K, N] weight or a quantized
    `QuantizedTensor` (`fp4_grouped_matmul`, same semantics). Layers call this and never branch on dtype."""
    if isinstance(w_EKN, QuantizedTensor):
        return fp4_grouped_matmul(x_MK, w_EKN, group_sizes_E, impl=impl)
    return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E)


def batched_matmul(x_ECK: jax.Array, w_EKN, impl: str = "xla") -> jax.Array:
    """Per-expert ``x[e] @ w[e]`` ([E, C, K] x [E, K, N] -> [E, C, N]) for a plain or quantized weight."""
    if isinstance(w_EKN, QuantizedTensor):
        return fp4_batched_matmul(x_ECK, w_EKN, impl=impl)
    return jnp.einsum("eck,ekn->ecn", x_ECK, w_EKN)


def weight_spec(w, spec: PartitionSpec):
    """shard_map spec of a weight: `spec` for an array; for a `QuantizedTensor` the same spec for its codes and
    block scales and the leading (expert) axis for its per-expert tensor scales."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(spec, spec, PartitionSpec(*tuple(spec)[: len(w.shape) - 2]), w.fmt, w.shape)
    return spec


def local_weight(w):
    """Inside shard_map: a QuantizedTensor's static logical shape is the global one; give it this shard's
    (leading axes and N from the local arrays; K is the global K unless the packed K axis was split)."""
    if not isinstance(w, QuantizedTensor):
        return w
    *lead, k2, n = w.codes.shape
    B = w.block_size
    K = w.K if 2 * k2 == -(-w.K // B) * B else 2 * k2
    return QuantizedTensor(w.codes, w.scales, w.tensor_scale, w.fmt, (*lead, K, n))


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

    def __call__(self, x_BTD: jax.Array, impl: str = "xla") -> jax.Array:
        # get_value(): a weight is an array or, in a quantized model, a QuantizedTensor (see `matmul`).
        g_BTF = matmul(x_BTD, self.gate_proj.get_value(), impl)
        u_BTF = matmul(x_BTD, self.up_proj.get_value(), impl)
        return matmul(jax.nn.silu(g_BTF) * u_BTF, self.down_proj.get_value(), impl)
