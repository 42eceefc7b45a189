"""Random weights at any dims, made on the devices: a model with the layout and formats a checkpoint of `cfg` would
load as (`abstract_model`: FP8 / FP4 kept, sharded on `mesh`), each weight generated where it lives (no host copy,
no checkpoint on disk). For benchmarks at DeepSeek-V3's dims on one GPU (`bench.gpu_check`), where a 671B
checkpoint is neither available nor needed: speed does not depend on the values.

Values: norms 1, router bias 0, other float weights N(0, 1/fan_in) (embedding 0.02); FP8 codes uniform over the
e4m3 bytes with the top exponent bit cleared (|code| < 2, never NaN) and block scales 1/sqrt(K); FP4 codes uniform
bytes (every nibble is a valid e2m1) with unit block scales and a tensor scale 1/(3 sqrt(K)).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.loader import abstract_model
from pallas_kernels.formats import QuantizedTensor
from pallas_kernels.fp8 import Fp8Tensor


@functools.lru_cache(maxsize=None)
def _maker(kind: str, shape: tuple, dtype, sharding):
    """A compiled fn(key, value) -> array of `shape` / `dtype` made directly in `sharding` (each device makes its
    shard); one compile per distinct (kind, shape, dtype, sharding), shared by the layers."""
    dtype = jnp.dtype(dtype)

    def make(key, v):
        if kind == "e4m3":    # uniform bytes, top exponent bit cleared: |code| < 2, never the NaN code
            return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint8) & 0xBF, dtype)
        if kind == "bytes":
            return jax.random.bits(key, shape, jnp.uint8)
        if kind == "normal":
            return (jax.random.normal(key, shape, jnp.float32) * v).astype(dtype)
        return jnp.full(shape, v, jnp.float32).astype(dtype)          # "full"

    return jax.jit(make, out_shardings=sharding)


def _made(like, kind: str, key, v: float = 0.0):
    out = _maker(kind, tuple(like.shape), jnp.dtype(like.dtype), getattr(like, "sharding", None))(key, v)
    assert out.shape == tuple(like.shape) and out.dtype == like.dtype, (out.shape, out.dtype, like)
    return out


def _fill(name: str, value, key):
    if isinstance(value, Fp8Tensor):
        return Fp8Tensor(_made(value.codes, "e4m3", key), _made(value.scales, "full", key, 1 / math.sqrt(value.K)),
                         value.shape, value.lead, value.k_ndim, value.block)
    if isinstance(value, QuantizedTensor):
        return QuantizedTensor(_made(value.codes, "bytes", key), _made(value.scales, "full", key, 1.0),
                               _made(value.tensor_scale, "full", key, 1 / (3 * math.sqrt(value.K))),
                               value.fmt, value.shape)
    if "norm" in name:
        return _made(value, "full", key, 1.0)
    if "correction_bias" in name or len(value.shape) < 2:
        return _made(value, "full", key, 0.0)
    return _made(value, "normal", key, 0.02 if "embed" in name else 1 / math.sqrt(value.shape[-2]))


def random_model(cfg, *, quant: str | None = "fp8", dtype=jnp.bfloat16, fp8_linears: bool = False, mesh=None,
                 rules=None, runtime=None, seed: int = 0):
    """A `DeepseekV3` of `cfg` with random weights in the formats `quant` / `fp8_linears` select (as
    `checkpoints.abstract_model`), placed on `mesh` by `rules`."""
    model = abstract_model(cfg, dtype=dtype, quant=quant, fp8_linears=fp8_linears, mesh=mesh, rules=rules,
                           runtime=runtime)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.Variable):
            var.set_value(_fill(".".join(map(str, path)), var.get_value(), jax.random.fold_in(key, i)))
    return model


__all__ = ["random_model"]
