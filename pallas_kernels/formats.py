"""FP4 weight formats: NVFP4 and MXFP4 (quantize, dequantize, pack, unpack).

Both formats store 4-bit e2m1 codes (sign, 2 exponent bits, 1 mantissa bit; values
0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) with one scale per block of consecutive K elements:

* ``nvfp4``: block of 16, block scale in float8_e4m3fn, plus one fp32 *tensor scale* (NVIDIA's two-level
  scaling): ``tensor_scale = amax(|W|) / (6 * 448)``, ``block_scale = e4m3(amax(|W_block|) / 6 / tensor_scale)``,
  ``W ~= code * block_scale * tensor_scale``.
* ``mxfp4``: block of 32, block scale in float8_e8m0fnu (a power of two), no tensor scale (stored as 1.0):
  ``block_scale = 2 ** (floor(log2(amax(|W_block|))) - 2)`` (OCP MX v1.0, emax(e2m1) = 2); ``code = e2m1(W / scale)``
  with values beyond +-6 clamped to +-6.

Layout (the "packed layout"; the same for both formats). A weight is logically ``[..., K, N]`` -- linear weights
are stored ``[in, out] = [K, N]`` and used as ``x[M, K] @ W[K, N]``; experts are ``[E, K, N]``. K is the blocked
and packed axis:

* ``codes``:  uint8 ``[..., Kp // 2, N]``; ``codes[..., j, n] = c[..., 2j, n] | (c[..., 2j + 1, n] << 4)`` where
  ``c`` are the 4-bit e2m1 codes (bit 3 = sign) -- the even K element in the low nibble.
* ``scales``: ``[..., Kp // B, N]`` (B = 16, float8_e4m3fn for nvfp4; B = 32, float8_e8m0fnu for mxfp4); scale row
  ``b`` covers K rows ``[b*B, (b+1)*B)``.
* ``tensor_scale``: float32 ``[...]`` (one per leading index, e.g. one per expert; a scalar for a 2-D weight).
* ``Kp = ceil(K / B) * B``: K is zero-padded to a whole number of blocks; the logical ``shape`` is kept.

Real NVFP4 checkpoints (e.g. NVIDIA ModelOpt ``weight`` uint8 ``[out, in/2]``, ``weight_scale`` e4m3 ``[out, in/16]``,
``weight_scale_2`` fp32 scalar) map onto this layout by transposing the last two axes of ``weight`` and
``weight_scale`` (a byte keeps its two K-neighbours together) and using ``weight_scale_2`` as ``tensor_scale``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jaxtyping import Array, Float, UInt8

Format = Literal["nvfp4", "mxfp4"]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE: dict[str, int] = {"nvfp4": 16, "mxfp4": 32}
SCALE_DTYPE = {"nvfp4": jnp.float8_e4m3fn, "mxfp4": jnp.float8_e8m0fnu}
# e2m1 value of each 4-bit code (bit 3 = sign).
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """An FP4 weight ``[..., K, N]`` (see the module docstring for the layout). A pytree: arrays are leaves,
    ``fmt`` and ``shape`` are static metadata, so it passes through jit / device_put / checkpoints."""

    codes: UInt8[Array, "... Kp2 N"]
    scales: Array  # [..., Kp // B, N], float8_e4m3fn (nvfp4) or float8_e8m0fnu (mxfp4)
    tensor_scale: Float[Array, "..."]
    fmt: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE[self.fmt]

    @property
    def K(self) -> int:
        return self.shape[-2]

    @property
    def N(self) -> int:
        return self.shape[-1]

    @property
    def padded_K(self) -> int:
        return self.codes.shape[-2] * 2

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + block scales + tensor scales."""
        return int(self.codes.nbytes + self.scales.nbytes + self.tensor_scale.nbytes)


# So that jax.export can serialize functions taking / returning QuantizedTensor.
export.register_pytree_node_serialization(
    QuantizedTensor,
    serialized_name="tandem.pallas_kernels.QuantizedTensor",
    serialize_auxdata=lambda aux: json.dumps([aux[0], list(aux[1])]).encode(),
    deserialize_auxdata=lambda b: (lambda v: (v[0], tuple(v[1])))(json.loads(b)),
)


def _check_fmt(fmt: str) -> None:
    if fmt not in BLOCK_SIZE:
        raise ValueError(f"unknown FP4 format {fmt!r}; expected one of {sorted(BLOCK_SIZE)}")


def _raise_non_finite(bad) -> None:
    if bool(bad):
        raise ValueError("FP4 quantize: input contains non-finite values (inf or nan); refusing to quantize")


def _reject_non_finite(w: jax.Array) -> None:
    bad = jnp.logical_not(jnp.all(jnp.isfinite(w)))
    if isinstance(bad, jax.core.Tracer):
        # Under jit: the check runs on the host when the computation executes and raises there.
        jax.debug.callback(_raise_non_finite, bad)
    else:
        _raise_non_finite(bad)


def round_to_e2m1(v: Float[Array, "..."]) -> Float[Array, "..."]:
    """Round to the e2m1 grid: round to nearest, ties to even, saturating at +-6 (input must be finite)."""
    v = jnp.clip(v.astype(jnp.float32), -E2M1_MAX, E2M1_MAX)
    return v.astype(jnp.float4_e2m1fn).astype(jnp.float32)


def encode_e2m1(v: Float[Array, "..."]) -> UInt8[Array, "..."]:
    """4-bit e2m1 codes (in uint8, 0..15) of finite values; round to nearest even, saturate at +-6."""
    q = jnp.clip(v.astype(jnp.float32), -E2M1_MAX, E2M1_MAX).astype(jnp.float4_e2m1fn)
    return jax.lax.bitcast_convert_type(q, jnp.uint4).astype(jnp.uint8)


def decode_e2m1(c: UInt8[Array, "..."]) -> Float[Array, "..."]:
    """Float32 values of 4-bit e2m1 codes."""
    return jnp.asarray(E2M1_VALUES)[c.astype(jnp.int32) & 0xF]


def pack_fp4(c: UInt8[Array, "... K N"]) -> UInt8[Array, "... K2 N"]:
    """Pack 4-bit codes two per byte along axis -2 (K must be even): low nibble = even row."""
    if c.shape[-2] % 2:
        raise ValueError(f"pack_fp4 needs an even K (axis -2), got shape {c.shape}")
    c = c.astype(jnp.uint8)
    return c[..., 0::2, :] | (c[..., 1::2, :] << 4)


def unpack_fp4(p: UInt8[Array, "... K2 N"]) -> UInt8[Array, "... K N"]:
    """Inverse of pack_fp4: ``[..., K/2, N]`` bytes -> ``[..., K, N]`` codes 0..15."""
    lo = p & 0xF
    hi = p >> 4
    return jnp.stack([lo, hi], axis=-2).reshape(*p.shape[:-2], p.shape[-2] * 2, p.shape[-1])


def decode_scales(scales: Array) -> Float[Array, "..."]:
    """Block scales as float32 (e4m3 or e8m0 -> f32, exact)."""
    return scales.astype(jnp.float32)


def _e8m0_from_exponent(e: jax.Array) -> jax.Array:
    """float8_e8m0fnu holding exactly 2**e (e clamped to [-127, 127]); built from the biased byte, because a
    float -> e8m0 cast rounds (3.0 -> 4.0) rather than flooring."""
    byte = (jnp.clip(e, -127, 127) + 127).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)


def quantize(w: Float[Array, "... K N"], fmt: Format = "nvfp4") -> QuantizedTensor:
    """Quantize a weight ``[..., K, N]`` (blocks along K) to NVFP4 or MXFP4.

    Rounding is to nearest, ties to even on the e2m1 grid; magnitudes beyond the largest code saturate at 6;
    an all-zero block gets scale 0 (nvfp4) / 2**-127 (mxfp4) and zero codes. Non-finite input raises ValueError
    (eagerly, or when the jitted computation runs). Leading axes (e.g. experts) get their own tensor scale.
    """
    _check_fmt(fmt)
    if jnp.ndim(w) < 2:
        raise ValueError(f"quantize needs a [..., K, N] weight, got shape {jnp.shape(w)}")
    _reject_non_finite(w)
    return _quantize(jnp.asarray(w), fmt)


@functools.partial(jax.jit, static_argnames="fmt")
def _quantize(w: Array, fmt: str) -> QuantizedTensor:
    B = BLOCK_SIZE[fmt]
    shape = tuple(int(d) for d in w.shape)
    *lead, K, N = shape
    Kp = -(-K // B) * B
    x = jnp.asarray(w, jnp.float32)
    if Kp != K:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, Kp - K), (0, 0)])
    xb = x.reshape(*lead, Kp // B, B, N)
    amax_b = jnp.max(jnp.abs(xb), axis=-2)  # [..., Kp/B, N]

    if fmt == "nvfp4":
        amax_t = jnp.max(amax_b, axis=(-2, -1))  # [...]
        ts = jnp.where(amax_t > 0, amax_t / (E2M1_MAX * E4M3_MAX), 1.0).astype(jnp.float32)
        s = amax_b / E2M1_MAX / ts[..., None, None]
        scales = jnp.clip(s, 0.0, E4M3_MAX).astype(jnp.float8_e4m3fn)
    else:
        _, ex = jnp.frexp(amax_b)  # amax = m * 2**ex, m in [0.5, 1): floor(log2(amax)) = ex - 1 (exact)
        e = jnp.where(amax_b > 0, ex - 1 - 2, -127)
        scales = _e8m0_from_exponent(e)
        ts = jnp.ones(tuple(lead), jnp.float32)

    eff = scales.astype(jnp.float32) * ts[..., None, None]  # [..., Kp/B, N]
    eff_b = eff[..., :, None, :]
    q = jnp.where(eff_b > 0, xb / jnp.where(eff_b > 0, eff_b, 1.0), 0.0)
    codes = encode_e2m1(q).reshape(*lead, Kp, N)
    return QuantizedTensor(pack_fp4(codes), scales, ts, fmt, shape)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(qt: QuantizedTensor, dtype: jnp.dtype = jnp.float32) -> Array:
    """Weight ``[..., K, N]`` from a QuantizedTensor: ``code * block_scale * tensor_scale`` (computed in f32)."""
    B = qt.block_size
    *lead, K, N = qt.shape
    Kp = qt.padded_K
    vals = decode_e2m1(unpack_fp4(qt.codes)).reshape(*lead, Kp // B, B, N)
    s = decode_scales(qt.scales)[..., :, None, :] * qt.tensor_scale[..., None, None, None]
    return (vals * s).reshape(*lead, Kp, N)[..., :K, :].astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_unscaled(qt: QuantizedTensor, dtype: jnp.dtype = jnp.bfloat16) -> Array:
    """``code * block_scale`` (no tensor scale), K padded to ``padded_K``: exact in bf16 (a 2-bit code times an
    e4m3 / power-of-two scale). The matmuls multiply by the tensor scale after the fp32-accumulated dot."""
    B = qt.block_size
    *lead, _, N = qt.shape
    Kp = qt.padded_K
    vals = decode_e2m1(unpack_fp4(qt.codes)).reshape(*lead, Kp // B, B, N)
    return (vals * decode_scales(qt.scales)[..., :, None, :]).reshape(*lead, Kp, N).astype(dtype)


def fp4_nbytes(shape: tuple[int, ...], fmt: Format) -> int:
    """Bytes of a QuantizedTensor of logical ``shape`` (without building it)."""
    _check_fmt(fmt)
    B = BLOCK_SIZE[fmt]
    *lead, K, N = shape
    Kp = -(-K // B) * B
    nlead = int(np.prod(lead)) if lead else 1
    return nlead * (Kp // 2 * N + Kp // B * N + 4)


def abstract(shape: tuple[int, ...], fmt: Format) -> QuantizedTensor:
    """A QuantizedTensor of ShapeDtypeStructs for a weight of logical `shape` (shapes and shardings, no data)."""
    _check_fmt(fmt)
    B = BLOCK_SIZE[fmt]
    *lead, K, N = shape
    Kp = -(-K // B) * B
    sds = jax.ShapeDtypeStruct
    return QuantizedTensor(sds((*lead, Kp // 2, N), jnp.uint8), sds((*lead, Kp // B, N), SCALE_DTYPE[fmt]),
                           sds(tuple(lead), jnp.float32), fmt, tuple(shape))


def from_nvfp4_checkpoint(weight: UInt8[Array, "... N K2"], weight_scale: Array, weight_scale_2: Array,
                          in_features: int | None = None) -> QuantizedTensor:
    """A QuantizedTensor from NVFP4 checkpoint tensors stored torch-style ``[out, in]`` (NVIDIA ModelOpt /
    HF ``weight`` uint8 ``[..., N, K/2]`` with the even K element in the low nibble, ``weight_scale`` e4m3
    ``[..., N, K/16]``, ``weight_scale_2`` fp32 per tensor). Only the last two axes are transposed: no re-quantization.
    ``in_features`` (K) defaults to ``2 * weight.shape[-1]``."""
    codes = jnp.swapaxes(jnp.asarray(weight, jnp.uint8), -1, -2)
    scales = jnp.swapaxes(jnp.asarray(weight_scale).astype(jnp.float8_e4m3fn), -1, -2)
    K = in_features or codes.shape[-2] * 2
    if scales.shape[-2] * 16 != codes.shape[-2] * 2:
        raise ValueError(f"weight_scale {weight_scale.shape} does not match weight {weight.shape} (one scale per 16)")
    lead = codes.shape[:-2]
    ts = jnp.asarray(weight_scale_2, jnp.float32)
    ts = jnp.full(lead, ts.reshape(()), jnp.float32) if ts.size == 1 else ts.reshape(lead)
    return QuantizedTensor(codes, scales, ts, "nvfp4", (*lead, K, codes.shape[-1]))
