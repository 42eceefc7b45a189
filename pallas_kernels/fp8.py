"""Block-FP8 weights (DeepSeek-V3/R1's release format) kept in FP8 on device, and W8A16 matmuls over them.

Format (`Fp8Tensor`): e4m3 codes with one float32 scale per `block` (default 128 x 128) of the weight seen as a
matrix [K, N]: ``W[k, n] = code[k, n] * scale[k // bk, n // bn]``. DeepSeek stores ``weight`` float8_e4m3fn
``[out, in]`` and ``weight_scale_inv`` float32 ``[ceil(out/128), ceil(in/128)]``; Tandem's layout is the
transpose ([in, out] = [K, N], `from_checkpoint`), with optional leading axes (experts ``[E, K, N]``) and K / N
spread over several logical axes for per-head weights (``o_proj [H, V, D]``: K = H*V; ``q_b_proj [Q, H, X]``:
N = H*X). The scales are always ``[*lead, ceil(K/bk), ceil(N/bn)]`` over the flattened K and N.

Matmuls (``impl`` as for FP4: "xla" | "pallas" | "pallas_interpret"):

    fp8_matmul(x[..., K], w[K, N])                    -> [..., N]
    fp8_batched_matmul(x[E, C, K], w[E, K, N])        -> [E, C, N]
    fp8_grouped_matmul(x[M, K], w[E, K, N], sizes[E]) -> [M, N]    (== ragged_dot over the dequantized weight)

Numerics (all implementations): codes are exact in bf16; each (bk x bn) tile's dot is accumulated in fp32 and
multiplied by its block scale (the Pallas kernels: scale after the tile's dot, as DeepSeek's kernels do; the XLA
path: dequantize to the compute dtype, then one dot). Per-head weights used inside attention einsums are
dequantized by XLA (`dequantize`), which fuses the convert-and-scale into its consumer on GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp4_matmul import _group_work_items, _round_up

E4M3_MAX = 448.0
BLOCK = (128, 128)
_IMPLS = ("xla", "pallas", "pallas_interpret")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Tensor:
    """A block-FP8 weight of logical `shape` = lead + K axes + N axes (see the module docstring)."""

    codes: jax.Array              # float8_e4m3fn, `shape`
    scales: jax.Array             # float32 [*lead, ceil(K/bk), ceil(N/bn)]
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    lead: int = dataclasses.field(default=0, metadata=dict(static=True))        # leading (batch/expert) axes
    k_ndim: int = dataclasses.field(default=1, metadata=dict(static=True))      # axes after lead forming K
    block: tuple[int, int] = dataclasses.field(default=BLOCK, metadata=dict(static=True))

    fmt = "fp8"

    @property
    def K(self) -> int:
        return math.prod(self.shape[self.lead:self.lead + self.k_ndim])

    @property
    def N(self) -> int:
        return math.prod(self.shape[self.lead + self.k_ndim:])

    @property
    def dtype(self):
        return jnp.dtype(jnp.float8_e4m3fn)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scales.nbytes)

    def scale_axes(self, axes: tuple) -> tuple:
        """Logical axes of `scales` given the weight's: lead axes, then the outermost K and N axes (a split of
        a flattened group is a split of its outermost axis)."""
        axes = tuple(axes)
        return axes[:self.lead] + (axes[self.lead], axes[self.lead + self.k_ndim])


export.register_pytree_node_serialization(
    Fp8Tensor,
    serialized_name="tandem.pallas_kernels.Fp8Tensor",
    serialize_auxdata=lambda aux: json.dumps([list(aux[0]), aux[1], aux[2], list(aux[3])]).encode(),
    deserialize_auxdata=lambda b: (lambda v: (tuple(v[0]), v[1], v[2], tuple(v[3])))(json.loads(b)),
)


def fp8_nbytes(shape: tuple[int, ...], lead: int = 0, k_ndim: int = 1, block: tuple[int, int] = BLOCK) -> int:
    """Bytes of an Fp8Tensor of logical `shape` (without building it)."""
    n_lead = math.prod(shape[:lead])
    K, N = math.prod(shape[lead:lead + k_ndim]), math.prod(shape[lead + k_ndim:])
    return math.prod(shape) + n_lead * (-(-K // block[0])) * (-(-N // block[1])) * 4


def abstract(shape: tuple[int, ...], *, lead: int = 0, k_ndim: int = 1, block: tuple[int, int] = BLOCK
             ) -> Fp8Tensor:
    """An Fp8Tensor of ShapeDtypeStructs for a weight of logical `shape` (shapes and shardings, no data)."""
    K, N = math.prod(shape[lead:lead + k_ndim]), math.prod(shape[lead + k_ndim:])
    sds = jax.ShapeDtypeStruct
    return Fp8Tensor(sds(tuple(shape), jnp.float8_e4m3fn),
                     sds((*shape[:lead], -(-K // block[0]), -(-N // block[1])), jnp.float32),
                     tuple(shape), lead, k_ndim, tuple(block))


def _matrix(x, lead: int, k_ndim: int):
    """[*lead, *kdims, *ndims] -> [*lead, K, N]."""
    s = x.shape
    return x.reshape(*s[:lead], math.prod(s[lead:lead + k_ndim]), math.prod(s[lead + k_ndim:]))


def _expand_scales(scales, K: int, N: int, block):
    bk, bn = block
    s = jnp.repeat(jnp.repeat(scales, bk, axis=-2), bn, axis=-1)
    return s[..., :K, :N]


def quantize(w, *, lead: int = 0, k_ndim: int = 1, block: tuple[int, int] = BLOCK) -> Fp8Tensor:
    """Block-FP8 of a float weight (scale = block amax / 448, codes rounded to nearest e4m3)."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < lead + k_ndim + 1:
        raise ValueError(f"fp8 quantize: shape {w.shape} has no N axis after lead={lead}, k_ndim={k_ndim}")
    m = _matrix(w, lead, k_ndim)
    *ls, K, N = m.shape
    bk, bn = block
    Kp, Np = _round_up(K, bk), _round_up(N, bn)
    mp = jnp.pad(m, [(0, 0)] * len(ls) + [(0, Kp - K), (0, Np - N)])
    amax = jnp.abs(mp.reshape(*ls, Kp // bk, bk, Np // bn, bn)).max(axis=(-3, -1))
    scales = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    # clip: m / (amax / 448) can round a hair past 448, and e4m3fn has no infinity (it would become NaN)
    codes = jnp.clip(m / _expand_scales(scales, K, N, block), -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return Fp8Tensor(codes.reshape(w.shape), scales, tuple(w.shape), lead, k_ndim, tuple(block))


def from_checkpoint(weight: np.ndarray, scale_inv: np.ndarray, shape: tuple[int, ...], *, lead: int = 0,
                    k_ndim: int = 1, block: tuple[int, int] = BLOCK) -> Fp8Tensor:
    """DeepSeek block-FP8 tensors stored torch-style (``weight`` e4m3 ``[*lead, out, in]``, ``weight_scale_inv``
    f32 ``[*lead, ceil(out/bo), ceil(in/bi)]``, `block` = (bo, bi) as in ``weight_block_size``) -> an Fp8Tensor of
    logical `shape` (K = in, N = out). Only transposes: no re-quantization. Host arrays in, host arrays out (numpy),
    so a caller can place them shard by shard."""
    weight = np.asarray(weight)
    if weight.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn codes, got {weight.dtype}")
    bo, bi = block
    out, inn = weight.shape[-2:]
    want = (*weight.shape[:-2], -(-out // bo), -(-inn // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} for a "
                         f"{list(weight.shape)} weight in {bo}x{bi} blocks")
    codes = np.swapaxes(weight, -1, -2)
    if math.prod(shape) != codes.size or math.prod(shape[lead:lead + k_ndim]) != inn:
        raise ValueError(f"a [{out}, {inn}] weight does not fit logical shape {shape} (lead={lead}, "
                         f"k_ndim={k_ndim})")
    return Fp8Tensor(codes.reshape(shape), np.ascontiguousarray(np.swapaxes(scale_inv, -1, -2), np.float32),
                     tuple(shape), lead, k_ndim, (bi, bo))


def dequantize(w: Fp8Tensor, dtype=jnp.float32) -> jax.Array:
    """The weight in `dtype`, logical shape (code * block scale, computed in f32)."""
    m = _matrix(w.codes, w.lead, w.k_ndim).astype(jnp.float32)
    m = m * _expand_scales(w.scales.astype(jnp.float32), m.shape[-2], m.shape[-1], w.block)
    return m.reshape(w.shape).astype(dtype)


def local(w: Fp8Tensor) -> Fp8Tensor:
    """Inside shard_map: the local shard's logical shape (from its arrays)."""
    return dataclasses.replace(w, shape=tuple(w.codes.shape))


# ---- implementations ------------------------------------------------------------------------------------------
def _compute_dtype(x):
    return x.dtype if x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) else jnp.dtype(jnp.bfloat16)


def _check(x, w: Fp8Tensor, ndim: int):
    if not isinstance(w, Fp8Tensor):
        raise TypeError(f"expected an Fp8Tensor, got {type(w).__name__}")
    if len(w.shape) != ndim or w.k_ndim != 1 or w.lead != ndim - 2:
        raise ValueError(f"expected a {ndim}-D [.., K, N] Fp8Tensor, got shape {w.shape} (lead={w.lead}, "
                         f"k_ndim={w.k_ndim})")
    if x.shape[-1] != w.K:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={w.K} (shape {w.shape})")


def _impl(impl):
    impl = impl or ("pallas" if jax.default_backend() in ("gpu", "cuda", "rocm") else "xla")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    return impl


def _decode_e4m3(c):
    """uint8 e4m3fn codes -> value * 2**-8 in f32, by bit placement into an f16 (exact, subnormals included;
    e4m3fn's NaN code 0x7F/0xFF is never stored in a weight)."""
    c = c.astype(jnp.int32)
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _tile_scales(w: Fp8Tensor, Kq: int, Nq: int, bk: int, bn: int):
    """Block scales expanded to one per (bk x bn) tile, [*lead, Kq/bk, Nq/bn], times 2**8 (undoes _decode_e4m3)."""
    s = w.scales.astype(jnp.float32) * 256.0
    bK, bN = w.block
    s = jnp.repeat(jnp.repeat(s, bK // bk, axis=-2), bN // bn, axis=-1)
    pad_k, pad_n = Kq // bk - s.shape[-2], Nq // bn - s.shape[-1]
    if pad_k > 0 or pad_n > 0:
        s = jnp.pad(s, [(0, 0)] * (s.ndim - 2) + [(0, max(pad_k, 0)), (0, max(pad_n, 0))])
    return s[..., :Kq // bk, :Nq // bn]


# Tile table (rows of x -> bm, num_warps), Hopper-first: decode-sized M gets the smallest tile that covers it
# (weight-bandwidth bound: every weight tile is read once per bm rows); from 64 rows a tile is one wgmma
# warpgroup (m64), from 256 rows two (bm=128, 8 warps) -- 3 stages of 128x128 bf16 x + u8 codes = 144 KiB of
# shared memory (Hopper: 227 KiB). bench.gpu_check times the alternatives on the card.
TILE_TABLE = ((16, 16, 4), (32, 32, 4), (64, 64, 4), (255, 64, 4), (None, 128, 8))


def _tiles(M: int, N: int, block, bm: int | None = None):
    """(bm, bn, bk, num_warps): bm from TILE_TABLE (or given); bk / bn = 128, or the block size when it is
    smaller, so that a tile never straddles two scale blocks (one scale per tile)."""
    bK, bN = block
    for b in (bK, bN):
        if b < 16 or b & (b - 1):
            raise ValueError(f"the FP8 Pallas kernels need power-of-two blocks >= 16, got {block}; use impl='xla'")
    warps = 4
    if bm is None:
        for max_m, bm, warps in TILE_TABLE:
            if max_m is None or M <= max_m:
                break
    elif bm < 16 or bm & (bm - 1):
        raise ValueError(f"bm={bm} must be a power of two >= 16")
    else:
        warps = 8 if bm >= 128 else 4
    return bm, min(128, bN), min(128, bK), warps


def _codes_u8(w: Fp8Tensor, Kq: int, Nq: int):
    c = jax.lax.bitcast_convert_type(w.codes, jnp.uint8)
    K, N = c.shape[-2:]
    if (Kq, Nq) != (K, N):
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, Kq - K), (0, Nq - N)])
    return c


def _bmm_kernel(x_ref, c_ref, s_ref, o_ref, *, bk: int, nk: int):
    """Program (e, i, j): o[e, i-tile, j-tile] = sum_k (x_k @ codes_k) * scale[k, j]."""
    bm, bn = o_ref.shape

    def body(k, acc):
        x = x_ref[:, pl.ds(k * bk, bk)]
        w = _decode_e4m3(c_ref[pl.ds(k * bk, bk), :]).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32) * s_ref[k, 0]

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params(interpret: bool, num_warps: int = 4):
    return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=3)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "bm"))
def _pallas_batched(x_ECK, w: Fp8Tensor, out_dtype, interpret: bool, bm: int | None = None):
    E, C, K = x_ECK.shape
    bm, bn, bk, warps = _tiles(C, w.N, w.block, bm)
    Kq, Nq, Cq = _round_up(K, bk), _round_up(w.N, bn), _round_up(C, bm)
    codes = _codes_u8(w, Kq, Nq)
    scales = _tile_scales(w, Kq, Nq, bk, bn)
    x = jnp.pad(x_ECK.astype(_compute_dtype(x_ECK)), ((0, 0), (0, Cq - C), (0, Kq - K)))
    out = pl.pallas_call(
        functools.partial(_bmm_kernel, bk=bk, nk=Kq // bk),
        out_shape=jax.ShapeDtypeStruct((E, Cq, Nq), out_dtype),
        grid=(E, Cq // bm, Nq // bn),
        in_specs=[pl.BlockSpec((None, bm, Kq), lambda e, i, j: (e, i, 0)),
                  pl.BlockSpec((None, Kq, bn), lambda e, i, j: (e, 0, j)),
                  pl.BlockSpec((None, Kq // bk, 1), lambda e, i, j: (e, 0, j))],
        out_specs=pl.BlockSpec((None, bm, bn), lambda e, i, j: (e, i, j)),
        interpret=interpret, compiler_params=_compiler_params(interpret, warps), name="fp8_block_matmul",
    )(x, codes, scales)
    return out[:, :C, :w.N]


def _grouped_kernel(g_ref, r0_ref, r1_ref, x_ref, c_ref, s_ref, o_ref, *, bm: int, bn: int, bk: int, nk: int):
    """Program (t, j): work item t = rows [r0, r1) of expert g (at most bm rows), N tile j."""
    t, j = pl.program_id(0), pl.program_id(1)
    g, r0, r1 = g_ref[t], r0_ref[t], r1_ref[t]
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    @pl.when(r0 < r1)
    def _():
        rows = pl.ds(r0, bm)

        def body(k, acc):
            x = x_ref[rows, pl.ds(k * bk, bk)]
            w = _decode_e4m3(c_ref[g, pl.ds(k * bk, bk), cols]).astype(x.dtype)
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32) * s_ref[g, k, j]

        acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
        row_ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)) < r1
        plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "bm"))
def _pallas_grouped(x_MK, w: Fp8Tensor, group_sizes_E, out_dtype, interpret: bool, bm: int | None = None):
    M, K = x_MK.shape
    bm, bn, bk, warps = _tiles(M, w.N, w.block, bm)
    Kq, Nq = _round_up(K, bk), _round_up(w.N, bn)
    Mq = _round_up(M, bm) + bm  # a bm-row load starting at any row < M stays in bounds
    codes = _codes_u8(w, Kq, Nq)
    scales = _tile_scales(w, Kq, Nq, bk, bn)
    x = jnp.pad(x_MK.astype(_compute_dtype(x_MK)), ((0, Mq - M), (0, Kq - K)))
    g, r0, r1 = _group_work_items(group_sizes_E, M, bm)
    out = pl.pallas_call(
        functools.partial(_grouped_kernel, bm=bm, bn=bn, bk=bk, nk=Kq // bk),
        out_shape=jax.ShapeDtypeStruct((Mq, Nq), out_dtype),
        grid=(g.shape[0], Nq // bn),
        interpret=interpret, compiler_params=_compiler_params(interpret, warps), name="fp8_block_grouped_matmul",
    )(g, r0, r1, x, codes, scales)
    total = jnp.minimum(jnp.sum(jnp.maximum(group_sizes_E, 0)), M)
    covered = jnp.arange(M) < total  # rows no work item wrote (past the groups) are zero, as in ragged_dot
    return jnp.where(covered[:, None], out[:M, :w.N], jnp.zeros((), out_dtype))


# ---- public dispatchers -----------------------------------------------------------------------------------------
def fp8_matmul(x, w: Fp8Tensor, *, impl: str | None = None, out_dtype=None, bm: int | None = None):
    """``x[..., K] @ dequantize(w)`` for a [K, N] Fp8Tensor; fp32 accumulation. ``bm`` overrides the tile table."""
    _check(x, w, 2)
    impl, out_dtype = _impl(impl), out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.K)
    if impl == "xla":
        cd = _compute_dtype(x)
        y = jnp.dot(x2.astype(cd), dequantize(w, cd), preferred_element_type=jnp.float32).astype(out_dtype)
    else:
        w3 = Fp8Tensor(w.codes[None], w.scales[None], (1, *w.shape), 1, 1, w.block)
        y = _pallas_batched(x2[None], w3, out_dtype, impl == "pallas_interpret", bm)[0]
    return y.reshape(*lead, w.N)


def fp8_batched_matmul(x_ECK, w: Fp8Tensor, *, impl: str | None = None, out_dtype=None, bm: int | None = None):
    """Per-expert ``x[e] @ dequantize(w)[e]`` for an [E, K, N] Fp8Tensor."""
    _check(x_ECK, w, 3)
    impl, out_dtype = _impl(impl), out_dtype or x_ECK.dtype
    if impl == "xla":
        cd = _compute_dtype(x_ECK)
        return jnp.einsum("eck,ekn->ecn", x_ECK.astype(cd), dequantize(w, cd),
                          preferred_element_type=jnp.float32).astype(out_dtype)
    return _pallas_batched(x_ECK, w, out_dtype, impl == "pallas_interpret", bm)


def fp8_grouped_matmul(x_MK, w: Fp8Tensor, group_sizes_E, *, impl: str | None = None, out_dtype=None,
                       bm: int | None = None):
    """``lax.ragged_dot(x, dequantize(w), group_sizes)`` for an [E, K, N] Fp8Tensor (rows sorted by expert)."""
    _check(x_MK, w, 3)
    if group_sizes_E.shape != (w.shape[0],):
        raise ValueError(f"group_sizes has shape {group_sizes_E.shape}, expected ({w.shape[0]},)")
    impl, out_dtype = _impl(impl), out_dtype or x_MK.dtype
    if impl == "xla":
        cd = _compute_dtype(x_MK)
        return jax.lax.ragged_dot(x_MK.astype(cd), dequantize(w, cd), group_sizes_E.astype(jnp.int32),
                                  preferred_element_type=jnp.float32).astype(out_dtype)
    return _pallas_grouped(x_MK, w, group_sizes_E, out_dtype, impl == "pallas_interpret", bm)


__all__ = ["Fp8Tensor", "quantize", "dequantize", "from_checkpoint", "fp8_nbytes", "fp8_matmul",
           "fp8_batched_matmul", "fp8_grouped_matmul", "local"]
