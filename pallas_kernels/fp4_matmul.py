"""FP4-weight x bf16-activation matmuls: Pallas (Triton) kernels, XLA implementations and a backend dispatcher.

Public API::

    fp4_matmul(x_MK, w, *, impl=None, out_dtype=None) -> [M, N]              # x @ dequant(w), w: [K, N]; x [..., K] ok
    fp4_batched_matmul(x_ECK, w, *, impl=None, out_dtype=None) -> [E, C, N]  # fixed capacity per expert, w: [E, K, N]
    fp4_grouped_matmul(x_MK, w, group_sizes_E, *, impl=None, out_dtype=None) -> [M, N]
        # == jax.lax.ragged_dot(x, dequant(w), group_sizes): rows of x sorted by expert, group_sizes[e] rows for
        # expert e; rows past sum(group_sizes) are 0.

``impl``: ``None`` picks by ``jax.default_backend()`` (cpu/tpu -> "xla", gpu -> "pallas"); or one of
``"xla"`` (dequantize + dot), ``"pallas"`` (Triton kernel; GPU only), ``"pallas_interpret"`` (the same kernel
run by the Pallas interpreter; any backend, slow, for tests).

Numerics (all implementations): the weight tile is dequantized to ``code * block_scale`` -- exact in bf16 -- and
multiplied with the activations (cast to the compute dtype: bf16 stays bf16) with fp32 accumulation; the fp32
tensor scale multiplies the fp32 accumulator; the result is cast to ``out_dtype`` (default: x's dtype).

Kernel tiling (see docs/fp4.md): programs over (M tiles, N tiles) -- plus experts for the batched kernel, or
(expert, row-tile) work items for the grouped one -- each looping over K in ``bk``-row steps. Packed bytes hold two
K-neighbours, so the wrapper splits x into its even and odd K columns and the kernel computes
``x_even @ dequant(low nibbles) + x_odd @ dequant(high nibbles)``: no in-kernel interleave. Shapes that are not
multiples of the tiles are zero-padded in the wrapper (activations always; weights only when K or N is not a
multiple of the tile, which real model dims are) and the output sliced.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.formats import BLOCK_SIZE, QuantizedTensor, dequantize_unscaled

Impl = Literal["xla", "pallas", "pallas_interpret"]
_IMPLS = ("xla", "pallas", "pallas_interpret")


# ----------------------------------------------------------------------------------------------------------
# Dispatch helpers
# ----------------------------------------------------------------------------------------------------------


def default_impl(backend: str | None = None) -> str:
    """The implementation used for a backend: Pallas Triton on GPU, XLA (dequantize + dot) elsewhere."""
    backend = backend or jax.default_backend()
    return "pallas" if backend in ("gpu", "cuda", "rocm") else "xla"


def _resolve_impl(impl: str | None) -> str:
    impl = impl or default_impl()
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    return impl


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    return x.dtype if x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) else jnp.dtype(jnp.bfloat16)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _next_pow2(a: int) -> int:
    return 1 << max(0, (a - 1).bit_length())


def _check_w(x: jax.Array, w: QuantizedTensor, ndim: int) -> None:
    if len(w.shape) != ndim:
        raise ValueError(f"expected a {ndim}-D QuantizedTensor, got logical shape {w.shape}")
    if x.shape[-1] != w.K:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={w.K} (shape {w.shape})")


# ----------------------------------------------------------------------------------------------------------
# XLA implementations (used on CPU)
# ----------------------------------------------------------------------------------------------------------


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


@functools.partial(jax.jit, static_argnames="out_dtype")
def _xla_matmul(x_MK, w: QuantizedTensor, out_dtype) -> jax.Array:
    cd = _compute_dtype(x_MK)
    w_KN = dequantize_unscaled(w, cd)
    x = _pad_last(x_MK.astype(cd), w.padded_K)
    acc = jnp.dot(x, w_KN, preferred_element_type=jnp.float32)
    return (acc * w.tensor_scale).astype(out_dtype)


@functools.partial(jax.jit, static_argnames="out_dtype")
def _xla_batched(x_ECK, w: QuantizedTensor, out_dtype) -> jax.Array:
    cd = _compute_dtype(x_ECK)
    w_EKN = dequantize_unscaled(w, cd)
    x = _pad_last(x_ECK.astype(cd), w.padded_K)
    acc = jnp.einsum("eck,ekn->ecn", x, w_EKN, preferred_element_type=jnp.float32)
    return (acc * w.tensor_scale[:, None, None]).astype(out_dtype)


def _row_expert(group_sizes_E: jax.Array, M: int) -> jax.Array:
    """Expert index of each row of a sorted-by-expert batch (rows past the total get E, clipped by callers)."""
    ends = jnp.cumsum(group_sizes_E)
    return jnp.searchsorted(ends, jnp.arange(M, dtype=ends.dtype), side="right")


@functools.partial(jax.jit, static_argnames="out_dtype")
def _xla_grouped(x_MK, w: QuantizedTensor, group_sizes_E, out_dtype) -> jax.Array:
    cd = _compute_dtype(x_MK)
    w_EKN = dequantize_unscaled(w, cd)
    x = _pad_last(x_MK.astype(cd), w.padded_K)
    acc = jax.lax.ragged_dot(x, w_EKN, group_sizes_E.astype(jnp.int32), preferred_element_type=jnp.float32)
    E = w.shape[0]
    ts_M = w.tensor_scale[jnp.minimum(_row_expert(group_sizes_E, x.shape[0]), E - 1)]
    return (acc * ts_M[:, None]).astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Pallas kernels (Triton backend on GPU; interpreter on CPU)
# ----------------------------------------------------------------------------------------------------------

_E2M1_F16_FACTOR = 2.0**14  # the f16 built from an e2m1 code's bits is value * 2**-14 (see _decode_codes)


def _decode_codes(c):
    """Packed-byte nibbles (int32 0..15) -> e2m1 value * 2**-14 in f32, by bit placement (exact): sign to bit 15,
    exponent+mantissa to bits 9..11 of an f16, so e2m1 (bias 1) becomes an f16 (bias 15) scaled by 2**-14."""
    bits = ((c & 8) << 12) | ((c & 7) << 9)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _decode_scales(s, fmt: str):
    """Raw scale bytes (uint8) -> f32: for nvfp4 the block scale * 2**14 (folding in the 2**14 that undoes
    _decode_codes' factor; e4m3 * 2**14 <= 448 * 2**14 cannot overflow); for mxfp4 the exact block scale (an
    e8m0 scale times 2**14 could overflow f32, so there the code is rescaled instead, see _dequant_tile).
    e4m3fn: bits << 7 form an f16 worth value * 2**-8 (bias 7 -> 15; subnormals too); sign/NaN are never stored.
    e8m0: byte << 23 is the f32 2**(byte - 127) (byte 0, 2**-127, flushes to 0)."""
    s = s.astype(jnp.int32)
    if fmt == "nvfp4":
        f = jax.lax.bitcast_convert_type(((s & 0x7F) << 7).astype(jnp.uint16), jnp.float16).astype(jnp.float32)
        return f * (2.0**8 * _E2M1_F16_FACTOR)
    return jax.lax.bitcast_convert_type(s << 23, jnp.float32)


def _dequant_tile(c_u8, s_u8, fmt: str, dtype):
    """One K tile: packed bytes [bk/2, bn] + scale bytes [bk/B, bn] -> (low, high) nibble weights [bk/2, bn] in
    ``dtype`` (code * block_scale, exact in bf16). Packed row j holds K rows 2j and 2j+1, both in block 2j // B."""
    bk2, bn = c_u8.shape
    sb = s_u8.shape[0]
    sc = _decode_scales(s_u8, fmt)
    sc = jnp.broadcast_to(sc[:, None, :], (sb, bk2 // sb, bn)).reshape(bk2, bn)
    c = c_u8.astype(jnp.int32)
    lo, hi = _decode_codes(c & 0xF), _decode_codes(c >> 4)
    if fmt == "mxfp4":  # exact e2m1 values first, so that code * 2**(b-127) is exact over the whole e8m0 range
        lo, hi = lo * _E2M1_F16_FACTOR, hi * _E2M1_F16_FACTOR
    return (lo * sc).astype(dtype), (hi * sc).astype(dtype)


def _bmm_kernel(xe_ref, xo_ref, c_ref, s_ref, ts_ref, o_ref, *, fmt: str, bk: int, nk: int):
    """Program (e, i, j): o[e, i-tile, j-tile] = ts[e] * sum_k xe @ lo_k + xo @ hi_k."""
    B = BLOCK_SIZE[fmt]
    bk2, sb = bk // 2, bk // B
    bm, bn = o_ref.shape

    def body(k, acc):
        xe = xe_ref[:, pl.ds(k * bk2, bk2)]
        xo = xo_ref[:, pl.ds(k * bk2, bk2)]
        lo, hi = _dequant_tile(c_ref[pl.ds(k * bk2, bk2), :], s_ref[pl.ds(k * sb, sb), :], fmt, xe.dtype)
        acc += jnp.dot(xe, lo, preferred_element_type=jnp.float32)
        acc += jnp.dot(xo, hi, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    ts = ts_ref[pl.program_id(0)]
    o_ref[...] = (acc * ts).astype(o_ref.dtype)


def _tiles(M: int, N: int, Kp: int, fmt: str, bm: int | None, bn: int | None, bk: int | None):
    """Tile sizes: powers of two >= 16 (tl.dot), bk a multiple of the block and >= 32 (two dots of bk/2 rows)."""
    if bm is None:
        bm = min(64, max(16, _next_pow2(M)))
    if bn is None:
        divs = [b for b in (128, 64, 32, 16) if N % b == 0]
        bn = divs[0] if divs else min(128, max(16, _next_pow2(N)))
    if bk is None:
        divs = [b for b in (128, 64, 32) if Kp % b == 0 and b % BLOCK_SIZE[fmt] == 0]
        bk = divs[0] if divs else 32
    for name, t in (("bm", bm), ("bn", bn), ("bk", bk)):
        if t < 16 or t & (t - 1):
            raise ValueError(f"{name}={t} must be a power of two >= 16")
    if bk % BLOCK_SIZE[fmt] or bk < 32:
        raise ValueError(f"bk={bk} must be >= 32 and a multiple of the {fmt} block size {BLOCK_SIZE[fmt]}")
    return bm, bn, bk


def _pad_weight(w: QuantizedTensor, Kt: int, Nt: int):
    """Codes / scale bytes of w padded (zeros) to K a multiple of Kt and N of Nt. Zero codes contribute 0 whatever
    the padded scale. A no-op (no copy) when w is already aligned, as real model weights are."""
    B = w.block_size
    Kp, N = w.padded_K, w.N
    Kq, Nq = _round_up(Kp, Kt), _round_up(N, Nt)
    scales_u8 = jax.lax.bitcast_convert_type(w.scales, jnp.uint8)
    codes = w.codes
    if (Kq, Nq) != (Kp, N):
        lead = [(0, 0)] * (codes.ndim - 2)
        codes = jnp.pad(codes, lead + [(0, (Kq - Kp) // 2), (0, Nq - N)])
        scales_u8 = jnp.pad(scales_u8, lead + [(0, (Kq - Kp) // B), (0, Nq - N)])
    return codes, scales_u8, Kq, Nq


def _split_even_odd(x: jax.Array, Kq: int, Mq: int) -> tuple[jax.Array, jax.Array]:
    """x [..., M, K] -> even / odd K columns [..., Mq, Kq/2], zero padded."""
    *lead, M, K = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, Mq - M), (0, Kq - K)])
    return x[..., 0::2], x[..., 1::2]


def _compiler_params(interpret: bool):
    return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=3)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "bm", "bn", "bk"))
def _pallas_batched(x_ECK, w: QuantizedTensor, out_dtype, interpret: bool, bm=None, bn=None, bk=None):
    E, C, K = x_ECK.shape
    bm, bn, bk = _tiles(C, w.N, w.padded_K, w.fmt, bm, bn, bk)
    codes, scales, Kq, Nq = _pad_weight(w, bk, bn)
    Cq = _round_up(C, bm)
    xe, xo = _split_even_odd(x_ECK.astype(_compute_dtype(x_ECK)), Kq, Cq)
    B = w.block_size
    kernel = functools.partial(_bmm_kernel, fmt=w.fmt, bk=bk, nk=Kq // bk)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((E, Cq, Nq), out_dtype),
        grid=(E, Cq // bm, Nq // bn),
        in_specs=[
            pl.BlockSpec((None, bm, Kq // 2), lambda e, i, j: (e, i, 0)),
            pl.BlockSpec((None, bm, Kq // 2), lambda e, i, j: (e, i, 0)),
            pl.BlockSpec((None, Kq // 2, bn), lambda e, i, j: (e, 0, j)),
            pl.BlockSpec((None, Kq // B, bn), lambda e, i, j: (e, 0, j)),
            pl.BlockSpec((E,), lambda e, i, j: (0,)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda e, i, j: (e, i, j)),
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name=f"fp4_{w.fmt}_matmul",
    )(xe, xo, codes, scales, w.tensor_scale.reshape(E).astype(jnp.float32))
    return out[:, :C, : w.N]


def _grouped_kernel(g_ref, r0_ref, r1_ref, xe_ref, xo_ref, c_ref, s_ref, ts_ref, o_ref, *,
                    fmt: str, bm: int, bn: int, bk: int, nk: int):
    """Program (t, j): work item t = rows [r0, r1) of expert g (at most bm rows, one expert), N tile j.
    Items with r0 >= r1 (the unused tail of the static item list) do nothing."""
    B = BLOCK_SIZE[fmt]
    bk2, sb = bk // 2, bk // B
    t, j = pl.program_id(0), pl.program_id(1)
    g, r0, r1 = g_ref[t], r0_ref[t], r1_ref[t]
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    @pl.when(r0 < r1)
    def _():
        rows = pl.ds(r0, bm)

        def body(k, acc):
            xe = xe_ref[rows, pl.ds(k * bk2, bk2)]
            xo = xo_ref[rows, pl.ds(k * bk2, bk2)]
            lo, hi = _dequant_tile(c_ref[g, pl.ds(k * bk2, bk2), cols], s_ref[g, pl.ds(k * sb, sb), cols],
                                   fmt, xe.dtype)
            acc += jnp.dot(xe, lo, preferred_element_type=jnp.float32)
            acc += jnp.dot(xo, hi, preferred_element_type=jnp.float32)
            return acc

        acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
        y = (acc * ts_ref[g]).astype(o_ref.dtype)
        row_ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)) < r1
        plgpu.store(o_ref.at[rows, cols], y, mask=row_ok)


def _group_work_items(group_sizes_E: jax.Array, M: int, bm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Static-length list of (expert, row start, row end) work items covering each group in bm-row pieces.
    Length cdiv(M, bm) + E bounds sum_e cdiv(size_e, bm); unused items get start == end."""
    E = group_sizes_E.shape[0]
    T = -(-M // bm) + E
    gs = jnp.maximum(group_sizes_E.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(gs), M)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    ntiles = (ends - starts + bm - 1) // bm
    tile_end = jnp.cumsum(ntiles)                      # items [tile_end[e] - ntiles[e], tile_end[e]) are expert e's
    t = jnp.arange(T, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), E - 1).astype(jnp.int32)
    local = t - (tile_end[g] - ntiles[g])
    r0 = starts[g] + local * bm
    valid = t < tile_end[-1]
    r0 = jnp.where(valid, r0, 0)
    r1 = jnp.where(valid, jnp.minimum(r0 + bm, ends[g]), 0)
    return g, r0.astype(jnp.int32), r1.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "bm", "bn", "bk"))
def _pallas_grouped(x_MK, w: QuantizedTensor, group_sizes_E, out_dtype, interpret: bool, bm=None, bn=None, bk=None):
    M, K = x_MK.shape
    E = w.shape[0]
    bm, bn, bk = _tiles(M, w.N, w.padded_K, w.fmt, bm, bn, bk)
    codes, scales, Kq, Nq = _pad_weight(w, bk, bn)
    Mq = _round_up(M, bm) + bm  # a bm-row load starting at any row < M stays in bounds
    xe, xo = _split_even_odd(x_MK.astype(_compute_dtype(x_MK)), Kq, Mq)
    g, r0, r1 = _group_work_items(group_sizes_E, M, bm)
    kernel = functools.partial(_grouped_kernel, fmt=w.fmt, bm=bm, bn=bn, bk=bk, nk=Kq // bk)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mq, Nq), out_dtype),
        grid=(g.shape[0], Nq // bn),
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name=f"fp4_{w.fmt}_grouped_matmul",
    )(g, r0, r1, xe, xo, codes, scales, w.tensor_scale.reshape(E).astype(jnp.float32))
    total = jnp.minimum(jnp.sum(jnp.maximum(group_sizes_E, 0)), M)
    covered = jnp.arange(M) < total  # rows no work item wrote (past the groups) are zero, as in ragged_dot
    return jnp.where(covered[:, None], out[:M, : w.N], jnp.zeros((), out_dtype))


# ----------------------------------------------------------------------------------------------------------
# Public dispatchers
# ----------------------------------------------------------------------------------------------------------


def fp4_matmul(x_MK: Float[Array, "*M K"], w: QuantizedTensor, *, impl: Impl | None = None,
               out_dtype: jnp.dtype | None = None, **tiles) -> Float[Array, "*M N"]:
    """``x @ dequantize(w)`` for an FP4 weight ``w`` of logical shape [K, N]; fp32 accumulation. x may have any
    leading dims (e.g. [B, S, K]). ``tiles`` (bm, bn, bk) override the Pallas tile sizes."""
    _check_w(x_MK, w, 2)
    impl = _resolve_impl(impl)
    out_dtype = out_dtype or x_MK.dtype
    lead = x_MK.shape[:-1]
    x2 = x_MK.reshape(-1, w.K)
    if impl == "xla":
        y = _xla_matmul(x2, w, out_dtype)
    else:
        w3 = QuantizedTensor(w.codes[None], w.scales[None], w.tensor_scale.reshape(1), w.fmt, (1, *w.shape))
        y = _pallas_batched(x2[None], w3, out_dtype, impl == "pallas_interpret", **tiles)[0]
    return y.reshape(*lead, w.N)


def fp4_batched_matmul(x_ECK: Float[Array, "E C K"], w: QuantizedTensor, *, impl: Impl | None = None,
                       out_dtype: jnp.dtype | None = None, **tiles) -> Float[Array, "E C N"]:
    """Per-expert ``x[e] @ dequantize(w)[e]`` with a fixed capacity C per expert; ``w`` is [E, K, N]."""
    _check_w(x_ECK, w, 3)
    if x_ECK.shape[0] != w.shape[0]:
        raise ValueError(f"x has {x_ECK.shape[0]} experts, w has {w.shape[0]}")
    impl = _resolve_impl(impl)
    out_dtype = out_dtype or x_ECK.dtype
    if impl == "xla":
        return _xla_batched(x_ECK, w, out_dtype)
    return _pallas_batched(x_ECK, w, out_dtype, impl == "pallas_interpret", **tiles)


def fp4_grouped_matmul(x_MK: Float[Array, "M K"], w: QuantizedTensor, group_sizes_E: Int[Array, " E"], *,
                       impl: Impl | None = None, out_dtype: jnp.dtype | None = None, **tiles) -> Float[Array, "M N"]:
    """Same semantics as ``jax.lax.ragged_dot(x, dequantize(w), group_sizes)``: rows of x sorted by expert,
    ``group_sizes_E[e]`` consecutive rows use expert e's [K, N] weight; rows past the total are 0."""
    _check_w(x_MK, w, 3)
    if group_sizes_E.shape != (w.shape[0],):
        raise ValueError(f"group_sizes has shape {group_sizes_E.shape}, expected ({w.shape[0]},)")
    impl = _resolve_impl(impl)
    out_dtype = out_dtype or x_MK.dtype
    if impl == "xla":
        return _xla_grouped(x_MK, w, group_sizes_E, out_dtype)
    return _pallas_grouped(x_MK, w, group_sizes_E, out_dtype, impl == "pallas_interpret", **tiles)


__all__ = ["fp4_matmul", "fp4_batched_matmul", "fp4_grouped_matmul", "default_impl", "Impl"]
