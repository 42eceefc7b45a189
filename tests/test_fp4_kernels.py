"""FP4 matmul kernels: Pallas kernels in interpret mode and the XLA path == reference within fp32 rounding, for
aligned and unaligned shapes; the grouped kernel == jax.lax.ragged_dot; every GPU (Triton) kernel lowers and exports
for the cuda platform on this CPU-only machine (a GPU is needed to show it compiles and runs correctly there)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.compat import cuda_lowering, lower_for_cuda
from pallas_kernels.formats import E2M1_VALUES, dequantize, quantize
from pallas_kernels.fp4_matmul import (
    _decode_codes,
    _decode_scales,
    _group_work_items,
    default_impl,
    fp4_batched_matmul,
    fp4_grouped_matmul,
    fp4_matmul,
)
from pallas_kernels.triton_check import triton_modules

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)

FMTS = ["nvfp4", "mxfp4"]
TRITON_CALL = "__gpu$xla.gpu.triton"


def _x(key: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(key).normal(size=shape), jnp.bfloat16)


@functools.lru_cache(maxsize=None)
def _qw(fmt: str, shape: tuple[int, ...], key: int = 1):
    """A quantized weight (heavy-tailed, so block scales vary) and its dequantization (float64 numpy)."""
    w = np.random.default_rng(key).standard_t(4.0, size=shape).astype(np.float32)
    qt = quantize(jnp.asarray(w), fmt)
    return qt, np.asarray(dequantize(qt), np.float64)


def _ref(x, w_deq):
    return np.asarray(x, np.float64) @ w_deq


def _ragged_ref(x, w_EKN, gs):
    """ragged_dot semantics in numpy: rows [start_e, start_e + gs[e]) use expert e; the rest are 0."""
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w_EKN.shape[-1]))
    start = 0
    for e, g in enumerate(gs):
        out[start:start + g] = x[start:start + g] @ w_EKN[e]
        start += g
    return out


def _assert_close(y, ref):
    """fp32 accumulation in another order: error far below one bf16 ulp of the result's scale."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1e-30)
    np.testing.assert_allclose(y, ref, rtol=0, atol=scale * 2e-6)


def test_in_kernel_decoders_are_exact():
    c = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(_decode_codes(c)) * 2.0**14, E2M1_VALUES)
    b = jnp.arange(0x7F, dtype=jnp.uint8)  # every non-negative, non-NaN e4m3fn byte (0x7F is NaN)
    e4m3 = np.asarray(jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(_decode_scales(b, "nvfp4")) / 2.0**14, e4m3)
    b = jnp.arange(1, 255, dtype=jnp.uint8)  # e8m0 2**-126 .. 2**127 (byte 0 = 2**-127 flushes to 0 in-kernel)
    np.testing.assert_array_equal(np.asarray(_decode_scales(b, "mxfp4")), 2.0 ** (np.arange(1, 255) - 127.0))


def test_default_dispatch():
    assert default_impl("cpu") == "xla" and default_impl("gpu") == "pallas" and default_impl("tpu") == "xla"
    assert default_impl() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    qt, _ = _qw("nvfp4", (32, 16))
    with pytest.raises(ValueError, match="impl must be one of"):
        fp4_matmul(_x(0, (2, 32)), qt, impl="triton")
    with pytest.raises(ValueError, match="K=31"):
        fp4_matmul(_x(0, (2, 31)), qt)


# (M, K, N, tiles): aligned single tile; unaligned everything; several M/N/K tiles with K and N padding
DENSE_CASES = [
    (16, 128, 64, {}),
    (5, 100, 40, {}),
    (20, 200, 72, dict(bm=16, bn=32, bk=64)),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,K,N,tiles", DENSE_CASES)
def test_dense_matches_reference(fmt, M, K, N, tiles):
    qt, w = _qw(fmt, (K, N))
    x = _x(M + K + N, (M, K))
    ref = _ref(x, w)
    y_xla = fp4_matmul(x, qt, impl="xla", out_dtype=jnp.float32)
    y_pl = fp4_matmul(x, qt, impl="pallas_interpret", out_dtype=jnp.float32, **tiles)
    assert y_xla.shape == y_pl.shape == (M, N)
    _assert_close(y_xla, ref)
    _assert_close(y_pl, ref)


def test_dense_bf16_output():
    qt, w = _qw("mxfp4", (64, 32))
    x = _x(3, (4, 64))
    y = fp4_matmul(x, qt, impl="pallas_interpret")  # default out dtype = x's
    assert y.dtype == jnp.bfloat16
    ref = _ref(x, w)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0, atol=np.abs(ref).max() * 2.0**-8)


def test_dense_leading_dims():
    qt, w = _qw("nvfp4", (64, 32))
    x = _x(4, (2, 3, 64))
    for impl in ("xla", "pallas_interpret"):
        y = fp4_matmul(x, qt, impl=impl, out_dtype=jnp.float32)
        assert y.shape == (2, 3, 32)
        _assert_close(y, _ref(x, w))


def test_dense_f32_activations_and_jit():
    qt, w = _qw("nvfp4", (64, 32))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 64)), jnp.float32)
    y = jax.jit(functools.partial(fp4_matmul, impl="pallas_interpret"))(x, qt)
    assert y.dtype == jnp.float32
    _assert_close(y, _ref(x, w))
    _assert_close(fp4_matmul(x, qt), _ref(x, w))  # default impl on this backend


@pytest.mark.parametrize("fmt", FMTS)
def test_batched_capacity_matches_reference(fmt):
    E, C, K, N = 3, 9, 96, 48
    qt, w = _qw(fmt, (E, K, N))
    x = _x(11, (E, C, K))
    ref = np.einsum("eck,ekn->ecn", np.asarray(x, np.float64), w)
    for impl in ("xla", "pallas_interpret"):
        y = fp4_batched_matmul(x, qt, impl=impl, out_dtype=jnp.float32)
        assert y.shape == (E, C, N)
        _assert_close(y, ref)


def test_group_work_items_cover_each_row_once():
    gs = jnp.array([0, 37, 5, 0, 16, 1], jnp.int32)
    M, bm = 70, 16
    g, r0, r1 = (np.asarray(a) for a in _group_work_items(gs, M, bm))
    ends = np.cumsum(np.asarray(gs))
    cover = np.zeros(M, int)
    for gi, a, b in zip(g, r0, r1):
        if a < b:
            assert b - a <= bm and (ends[gi] - gs[gi] <= a) and b <= ends[gi]
            cover[a:b] += 1
    np.testing.assert_array_equal(cover, (np.arange(M) < ends[-1]).astype(int))


GROUPED_CASES = [
    # (M, K, N, group sizes, tiles): sum < M (zero tail), empty groups, a group spanning several row tiles
    (40, 64, 32, [7, 0, 20, 3], dict(bm=16)),
    (13, 72, 40, [5, 0, 6], {}),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,K,N,gs,tiles", GROUPED_CASES)
def test_grouped_matches_ragged_dot(fmt, M, K, N, gs, tiles):
    E = len(gs)
    qt, w = _qw(fmt, (E, K, N))
    x = _x(M * K + N, (M, K))
    group_sizes = jnp.array(gs, jnp.int32)
    ref = _ragged_ref(x, w, gs)
    for impl in ("xla", "pallas_interpret"):
        y = fp4_grouped_matmul(x, qt, group_sizes, impl=impl, out_dtype=jnp.float32, **tiles)
        assert y.shape == (M, N)
        _assert_close(y, ref)
        assert np.all(np.asarray(y)[sum(gs):] == 0)


def test_grouped_under_jit_with_traced_group_sizes():
    qt, w = _qw("nvfp4", (4, 32, 16))
    x = _x(5, (24, 32))
    f = jax.jit(functools.partial(fp4_grouped_matmul, impl="pallas_interpret", out_dtype=jnp.float32))
    for gs in ([24, 0, 0, 0], [1, 2, 3, 18], [0, 0, 10, 4]):
        _assert_close(f(x, qt, jnp.array(gs, jnp.int32)), _ragged_ref(x, w, gs))


def test_grouped_swiglu_can_replace_ragged_dot():
    """expert_ffn's three ragged_dots with FP4 weights: same result as ragged_dot on the dequantized weights."""
    E, D, F, M = 3, 32, 48, 10
    gate, gate_w = _qw("nvfp4", (E, D, F), key=2)
    up, up_w = _qw("nvfp4", (E, D, F), key=3)
    down, down_w = _qw("nvfp4", (E, F, D), key=4)
    x = _x(9, (M, D))
    gs = jnp.array([4, 0, 6], jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)
    def ffn(mm, wg, wu, wd):
        return mm(jax.nn.silu(mm(x, wg, gs)) * mm(x, wu, gs), wd, gs)

    def ragged(a, b, g):
        return jax.lax.ragged_dot(a, b.astype(jnp.bfloat16), g)

    def fp4(a, b, g):
        return fp4_grouped_matmul(a, b, g, impl="xla")

    ref = ffn(ragged, *(jnp.asarray(w, jnp.float32) for w in (gate_w, up_w, down_w)))
    y = ffn(fp4, gate, up, down)
    assert y.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=0.05,
                               atol=0.02 * float(jnp.abs(ref.astype(jnp.float32)).max()))


# ------------------------------------------------------------------------------------------------------------
# GPU path: Triton lowering / export for cuda (no GPU needed to lower; a GPU is needed to compile and run)
# ------------------------------------------------------------------------------------------------------------


def _lowering_cases(fmt):
    x = jnp.zeros((16, 256), jnp.bfloat16)
    qt = quantize(jnp.ones((256, 128)), fmt)
    qe = quantize(jnp.ones((4, 256, 128)), fmt)
    gs = jnp.array([5, 3, 0, 8], jnp.int32)
    return {
        "dense": (functools.partial(fp4_matmul, impl="pallas"), (x, qt)),
        "dense_unaligned": (functools.partial(fp4_matmul, impl="pallas"),
                            (jnp.zeros((3, 100), jnp.bfloat16), quantize(jnp.ones((100, 40)), fmt))),
        "batched": (functools.partial(fp4_batched_matmul, impl="pallas"), (jnp.zeros((4, 8, 256), jnp.bfloat16), qe)),
        "grouped": (functools.partial(fp4_grouped_matmul, impl="pallas"), (x, qe, gs)),
    }


@pytest.mark.parametrize("fmt", FMTS)
def test_triton_kernels_lower_for_cuda(fmt):
    for name, (fn, args) in _lowering_cases(fmt).items():
        txt = lower_for_cuda(fn, *args)
        assert txt.count(f"stablehlo.custom_call @{TRITON_CALL}") == 1, name
        assert f"fp4_{fmt}_" in txt, name  # our kernel, not some other custom call
        assert "ir = \"ML" in txt, name  # the serialized Triton MLIR module is embedded


@pytest.mark.parametrize("fmt", FMTS)
def test_triton_kernels_export_for_cuda(fmt):
    for name, (fn, args) in _lowering_cases(fmt).items():
        if name == "dense_unaligned":
            continue
        with cuda_lowering():
            exp = export.export(jax.jit(fn), platforms=["cuda"],
                                disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
        blob = exp.serialize()
        back = export.deserialize(blob)
        assert back.platforms == ("cuda",)
        assert back.out_avals[0].shape == (*args[0].shape[:-1], 128) and back.out_avals[0].dtype == jnp.bfloat16
        assert TRITON_CALL in back.mlir_module()


def test_triton_module_is_extracted_from_the_custom_call():
    fn, args = _lowering_cases("nvfp4")["dense"]
    [mod] = triton_modules(fn, *args)
    assert mod["name"] == "fp4_nvfp4_matmul" and mod["num_warps"] == 4 and mod["num_stages"] == 3
    assert mod["ttir"].count("tt.dot") == 2  # x_even @ W_lo + x_odd @ W_hi
    assert "tt.bitcast" in mod["ttir"] and "scf.for" in mod["ttir"]  # bit-trick decode, K loop
    assert mod["grid"] == (1, 1, 1)  # E=1, M=16 / bm=16, N=128 / bn=128
