"""Building blocks: weight declaration with logical axes, RMSNorm, dense MLP.

Every weight is declared once, here or in a layer's `__init__`, through `param(...)`: shape, dtype and the
*logical* axis names (see `model/__init__.py` for the glossary). Shardings are derived from those names by the
rule sets in `sharding/` — layers never mention mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import PartitionSpec

from model.runtime import DEFAULT_RUNTIME
from pallas_kernels import fp8
from pallas_kernels.formats import QuantizedTensor, dequantize as fp4_dequantize
from pallas_kernels.fp4_matmul import fp4_batched_matmul, fp4_grouped_matmul, fp4_matmul
from pallas_kernels.fp8 import Fp8Tensor, fp8_batched_matmul, fp8_grouped_matmul, fp8_matmul

QUANTIZED = (QuantizedTensor, Fp8Tensor)
   # weight types kept packed on device (FP4, block FP8)


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
    """``x[..., K] @ w[K, N]`` for a plain weight, an FP4 `QuantizedTensor` or a block-FP8 `Fp8Tensor` (kept
    packed; their matmuls with `impl`, see `model.runtime.Runtime.matmul_impl`)."""
    if isinstance(w_KN, QuantizedTensor):
        return fp4_matmul(x_MK, w_KN, impl=impl)
    if isinstance(w_KN, Fp8Tensor):
        return fp8_matmul(x_MK, w_KN, impl=impl)
    return jnp.einsum("...k,kn->...n", x_MK, w_KN)


def _mesh_axes(part) -> tuple[str, ...]:
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def as_matrix(w, lead: int = 0, k_ndim: int = 1):
    """A weight [*lead, *K axes, *N axes] viewed as [*lead, K, N] (K and N axes flattened): for per-head weights
    (MLA's q_b_proj [Q, H, X], o_proj [H, V, D]) used as plain matmuls. A block-FP8 weight keeps its codes and
    block scales (its scales are already over the flattened K and N)."""
    shape = w.shape
    K = int(np.prod(shape[lead:lead + k_ndim]))
    N = int(np.prod(shape[lead + k_ndim:]))
    if isinstance(w, Fp8Tensor):
        assert (w.lead, w.k_ndim) == (lead, k_ndim), (w.lead, w.k_ndim, lead, k_ndim)
        return Fp8Tensor(w.codes.reshape(*shape[:lead], K, N), w.scales, (*shape[:lead], K, N), lead, 1, w.block)
    if isinstance(w, QuantizedTensor):
        raise ValueError("FP4 weights are [..., K, N] matrices already")
    return w.reshape(*shape[:lead], K, N)


def linear(x: jax.Array, var: nnx.Variable, runtime, *, k_ndim: int = 1) -> jax.Array:
    """``x[..., K] @ w[K, N]`` for the weight held by `var` under `runtime` (`model.runtime.Runtime`). With
    `k_ndim` > 1 or several N axes (per-head weights) the weight is used as its flattened matrix (`as_matrix`;
    x's last axis is the flattened K) and the result has the flattened N.

    A quantized weight split over mesh axes runs its kernel inside `shard_map` on the local shards: x's last axis
    split like K (then a psum over those axes), the output's like N, x's first axis over the "batch" mesh axes
    when they divide it (else replicated). Plain weights and unsplit ones are a plain matmul (GSPMD partitions
    it)."""
    w = var.get_value()
    axes = var.get_metadata().get("axes")
    if len(w.shape) > 2:    # per-head weight: its matrix view, logical axes of the outermost K and N axes
        w = as_matrix(w, 0, k_ndim)
        axes = None if axes is None else (axes[0], axes[k_ndim])
    impl = runtime.resolved_matmul_impl()
    spec = runtime.spec(axes) if isinstance(w, QUANTIZED) else None
    if spec is None or all(p is None for p in spec):
        return matmul(x, w, impl)
    mesh = runtime.mesh
    k_part, n_part = (tuple(spec) + (None, None))[:2]
    batch = tuple(a for a in _mesh_axes(runtime.spec(("batch",))[0]) if a not in _mesh_axes(k_part)
                  and a not in _mesh_axes(n_part))
    size = 1
    for a in batch:
        size *= mesh.shape[a]
    lead = [None] * (x.ndim - 1)
    if x.ndim > 1 and batch and x.shape[0] % size == 0:
        lead[0] = batch if len(batch) > 1 else batch[0]
    k_axes = _mesh_axes(k_part)

    def body(x_local, w_local):
        y = matmul(x_local, local_weight(w_local), impl)
        return jax.lax.psum(y, k_axes) if k_axes else y

    return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(*lead, k_part), weight_spec(w, spec)),
                         out_specs=PartitionSpec(*lead, n_part), check_vma=False)(x, w)


def dense(w, dtype) -> jax.Array:
    """A weight as a plain array in `dtype`, dequantizing a quantized one (XLA; for weights used inside
    einsums with head axes, e.g. MLA's per-head projections)."""
    if isinstance(w, QuantizedTensor):
        return fp4_dequantize(w, dtype)
    if isinstance(w, Fp8Tensor):
        return fp8.dequantize(w, dtype)
    return w


def grouped_matmul(x_MK: jax.Array, w_EKN, group_sizes_E: jax.Array, impl: str = "xla") -> jax.Array:
    """``lax.ragged_dot(x, w, group_sizes)`` (rows sorted by expert) for a plain [E, K, N] weight or a quantized
    `QuantizedTensor` (`fp4_grouped_matmul`, same semantics). Layers call this and never branch on dtype."""
    if isinstance(w_EKN, QuantizedTensor):
        return fp4_grouped_matmul(x_MK, w_EKN, group_sizes_E, impl=impl)
    if isinstance(w_EKN, Fp8Tensor):
        return fp8_grouped_matmul(x_MK, w_EKN, group_sizes_E, impl=impl)
    return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E)


def batched_matmul(x_ECK: jax.Array, w_EKN, impl: str = "xla") -> jax.Array:
    """Per-expert ``x[e] @ w[e]`` ([E, C, K] x [E, K, N] -> [E, C, N]) for a plain or quantized weight."""
    if isinstance(w_EKN, QuantizedTensor):
        return fp4_batched_matmul(x_ECK, w_EKN, impl=impl)
    if isinstance(w_EKN, Fp8Tensor):
        return fp8_batched_matmul(x_ECK, w_EKN, impl=impl)
    return jnp.einsum("eck,ekn->ecn", x_ECK, w_EKN)


def weight_spec(w, spec: PartitionSpec):
    """shard_map spec of a weight: `spec` for an array; for a `QuantizedTensor` the same spec for its codes and
    block scales and the leading (expert) axis for its per-expert tensor scales; for an `Fp8Tensor` the spec for
    its codes and (lead, first K, first N) parts for its block scales."""
    if isinstance(w, Fp8Tensor):
        parts = tuple(spec) + (None,) * (len(w.shape) - len(spec))
        return Fp8Tensor(spec, PartitionSpec(*w.scale_axes(parts)), w.shape, w.lead, w.k_ndim, w.block)
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(spec, spec, PartitionSpec(*tuple(spec)[: len(w.shape) - 2]), w.fmt, w.shape)
    return spec


def local_weight(w):
    """Inside shard_map: a QuantizedTensor's static logical shape is the global one; give it this shard's
    (leading axes and N from the local arrays; K is the global K unless the packed K axis was split)."""
    if isinstance(w, Fp8Tensor):
        return fp8.local(w)
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

    def __call__(self, x_BTD: jax.Array, runtime=None) -> jax.Array:
        # a weight is an array or, in a quantized model, a QuantizedTensor / Fp8Tensor (see `linear`)
        runtime = runtime if runtime is not None else DEFAULT_RUNTIME
        g_BTF = linear(x_BTD, self.gate_proj, runtime)
        u_BTF = linear(x_BTD, self.up_proj, runtime)
        return linear(jax.nn.silu(g_BTF) * u_BTF, self.down_proj, runtime)
