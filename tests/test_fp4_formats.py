"""NVFP4 / MXFP4 formats: e2m1 rounding, pack/unpack, quantize/dequantize error bounds, edge cases.

The oracles here are written independently of pallas_kernels.formats: numpy, explicit grids and the format
definitions (NVIDIA two-level scaling; OCP MX v1.0 for MXFP4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.formats import (
    QuantizedTensor,
    decode_e2m1,
    dequantize,
    encode_e2m1,
    fp4_nbytes,
    from_nvfp4_checkpoint,
    pack_fp4,
    quantize,
    round_to_e2m1,
    unpack_fp4,
)

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # code magnitudes 0..7; odd index = mantissa bit 1


def np_round_e2m1(v: np.ndarray) -> np.ndarray:
    """Nearest grid point, ties to the even code (mantissa bit 0), saturating at 6 -- by brute force."""
    a = np.minimum(np.abs(v), 6.0)
    d = np.abs(a[..., None] - GRID)
    best = d.min(-1, keepdims=True)
    cand = np.isclose(d, best, rtol=0, atol=0)
    # among tied candidates prefer the even index (ties are between neighbours: one even, one odd)
    idx = np.where(cand & (np.arange(8) % 2 == 0), np.arange(8), 99).min(-1)
    idx = np.where(idx == 99, np.argmax(cand, -1), idx)
    return np.sign(v) * GRID[idx]


def np_code_values(qt: QuantizedTensor) -> np.ndarray:
    """e2m1 value of every (padded) element, unpacked from the documented layout."""
    p = np.asarray(qt.codes)
    c = np.empty(p.shape[:-2] + (p.shape[-2] * 2, p.shape[-1]), np.uint8)
    c[..., 0::2, :] = p & 0xF
    c[..., 1::2, :] = p >> 4
    return np.where(c & 8, -1.0, 1.0) * GRID[c & 7]


def np_dequant(qt: QuantizedTensor) -> np.ndarray:
    """Reference dequantization straight from the documented layout."""
    vals = np_code_values(qt)
    B = qt.block_size
    s = np.repeat(np.asarray(qt.scales.astype(jnp.float32), np.float64), B, axis=-2)
    ts = np.asarray(qt.tensor_scale, np.float64)[..., None, None]
    K = qt.shape[-2]
    return (vals * s * ts)[..., :K, :]


def test_e2m1_round_ties_to_even_and_saturation():
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expect = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    np.testing.assert_array_equal(np.asarray(round_to_e2m1(jnp.asarray(ties))), expect)
    np.testing.assert_array_equal(np.asarray(round_to_e2m1(jnp.asarray(-ties))), -expect)
    big = np.array([6.0, 6.9, 7.0, 100.0, 3e38, -7.0, -1e30])
    np.testing.assert_array_equal(np.asarray(round_to_e2m1(jnp.asarray(big))), np.clip(big, -6, 6))
    v = np.random.default_rng(0).normal(scale=3.0, size=4096)
    v = np.concatenate([v, ties + 1e-6, ties - 1e-6, GRID, -GRID])
    np.testing.assert_array_equal(np.asarray(round_to_e2m1(jnp.asarray(v, jnp.float32))),
                                  np_round_e2m1(v.astype(np.float32)))


def test_e2m1_codes_round_trip_all_16():
    codes = jnp.arange(16, dtype=jnp.uint8)
    vals = decode_e2m1(codes)
    np.testing.assert_array_equal(np.asarray(vals), np.concatenate([GRID, -GRID]))
    back = np.asarray(encode_e2m1(vals))
    np.testing.assert_array_equal(back, np.arange(16))  # -0.0 keeps its sign bit (code 8)
    # the codes are the OCP/ml_dtypes e2m1 bit patterns
    np.testing.assert_array_equal(np.asarray(vals),
                                  np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32))


def test_pack_layout_and_round_trip():
    c = jnp.array([[1, 7], [2, 15], [0, 9], [8, 3]], jnp.uint8)  # [K=4, N=2]
    p = pack_fp4(c)
    np.testing.assert_array_equal(np.asarray(p), [[0x21, 0xF7], [0x80, 0x39]])  # even K row in the low nibble
    rng = np.random.default_rng(1)
    for shape in [(6, 5), (3, 10, 7), (2, 2, 32, 1)]:
        codes = jnp.asarray(rng.integers(0, 16, shape), jnp.uint8)
        packed = pack_fp4(codes)
        assert packed.shape == shape[:-2] + (shape[-2] // 2, shape[-1]) and packed.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(unpack_fp4(packed)), np.asarray(codes))
    with pytest.raises(ValueError, match="even K"):
        pack_fp4(jnp.zeros((3, 4), jnp.uint8))


@pytest.mark.parametrize("shape", [(64, 24), (50, 9), (3, 40, 16)])
def test_nvfp4_quantize_matches_definition_and_bound(shape):
    rng = np.random.default_rng(2)
    w = rng.standard_t(4, size=shape).astype(np.float32)  # heavy tails: a wide range of block scales
    qt = quantize(jnp.asarray(w), "nvfp4")
    *lead, K, N = shape
    Kp = -(-K // 16) * 16
    assert qt.codes.shape == (*lead, Kp // 2, N) and qt.codes.dtype == jnp.uint8
    assert qt.scales.shape == (*lead, Kp // 16, N) and qt.scales.dtype == jnp.float8_e4m3fn
    assert qt.tensor_scale.shape == tuple(lead) and qt.shape == shape and qt.fmt == "nvfp4"

    wp = np.zeros((*lead, Kp, N), np.float32)
    wp[..., :K, :] = w
    amax_t = np.abs(w).max(axis=(-2, -1))
    np.testing.assert_allclose(np.asarray(qt.tensor_scale), amax_t / (6 * 448), rtol=1e-6)
    amax_b = np.abs(wp.reshape(*lead, Kp // 16, 16, N)).max(-2)
    ts = np.asarray(qt.tensor_scale)[..., None, None]
    s_expect = (amax_b / 6 / ts).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = np.asarray(qt.scales.astype(jnp.float32))
    np.testing.assert_array_equal(s, s_expect)
    assert s.max() <= 448.0

    # codes are the RNE e2m1 rounding of w / effective scale, and the error is within half a grid step
    eff = np.repeat((s * ts).astype(np.float32), 16, axis=-2)
    deq = np_dequant(qt)
    np.testing.assert_allclose(np.asarray(dequantize(qt)), deq, rtol=1e-6, atol=0)
    q = np.where(eff > 0, wp / np.where(eff > 0, eff, np.float32(1)), np.float32(0))[..., :K, :]
    np.testing.assert_array_equal(np_code_values(qt)[..., :K, :], np_round_e2m1(q))
    half_step = np.where(np.abs(q) < 2, 0.25, np.where(np.abs(q) < 4, 0.5, 1.0)) * eff[..., :K, :]
    sat = np.maximum(np.abs(w) - 6 * eff[..., :K, :], 0)  # block scale rounded down by e4m3: at most 1/16 over
    assert np.all(np.abs(deq - w) <= half_step * (1 + 1e-6) + sat)
    assert np.all(sat <= np.abs(w) / 16 + 1e-12)
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert rel < 0.12, rel


@pytest.mark.parametrize("shape", [(64, 24), (70, 5), (2, 96, 8)])
def test_mxfp4_quantize_matches_ocp_definition_and_bound(shape):
    rng = np.random.default_rng(3)
    w = (rng.normal(size=shape) * np.exp(rng.normal(size=shape[:-2] + (1, shape[-1])) * 3)).astype(np.float32)
    qt = quantize(jnp.asarray(w), "mxfp4")
    *lead, K, N = shape
    Kp = -(-K // 32) * 32
    assert qt.codes.shape == (*lead, Kp // 2, N) and qt.scales.shape == (*lead, Kp // 32, N)
    assert qt.scales.dtype == jnp.float8_e8m0fnu
    np.testing.assert_array_equal(np.asarray(qt.tensor_scale), np.ones(lead, np.float32))
    wp = np.zeros((*lead, Kp, N), np.float32)
    wp[..., :K, :] = w
    amax_b = np.abs(wp.reshape(*lead, Kp // 32, 32, N)).max(-2)
    s = np.asarray(qt.scales.astype(jnp.float32))
    np.testing.assert_array_equal(s, 2.0 ** (np.floor(np.log2(amax_b)) - 2))
    eff = np.repeat(s, 32, axis=-2)[..., :K, :]
    deq = np_dequant(qt)
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), deq.astype(np.float32))
    np.testing.assert_array_equal(np_code_values(qt)[..., :K, :], np_round_e2m1((w / eff).astype(np.float32)))
    q = w / eff
    half_step = np.where(np.abs(q) < 2, 0.25, np.where(np.abs(q) < 4, 0.5, 1.0)) * eff
    sat = np.maximum(np.abs(w) - 6 * eff, 0)  # |w|/scale in (6, 8) clamps to 6 (OCP MX)
    assert np.all(np.abs(deq - w) <= half_step + sat)
    assert np.all(sat <= 2 * eff)
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < 0.15


def test_mxfp4_saturation_example():
    w = np.zeros((32, 1), np.float32)
    w[0, 0], w[1, 0], w[2, 0] = 7.5, -7.9, 0.7  # amax 7.9 -> scale 2**(2-2) = 1; 7.5 and -7.9 clamp to +-6
    d = np.asarray(dequantize(quantize(jnp.asarray(w), "mxfp4")))[:, 0]
    assert d[0] == 6.0 and d[1] == -6.0 and d[2] == 0.5 and np.all(d[3:] == 0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_zero_blocks_and_zero_tensor(fmt):
    B = 16 if fmt == "nvfp4" else 32
    w = np.random.default_rng(4).normal(size=(4 * B, 3)).astype(np.float32)
    w[B:2 * B, 1] = 0.0   # one all-zero block
    w[:, 2] = 0.0         # an all-zero column
    qt = quantize(jnp.asarray(w), fmt)
    d = np.asarray(dequantize(qt))
    assert np.all(d[B:2 * B, 1] == 0) and np.all(d[:, 2] == 0) and np.all(np.isfinite(d))
    codes = np.asarray(unpack_fp4(qt.codes))
    assert np.all(codes[B:2 * B, 1] & 7 == 0)
    if fmt == "nvfp4":
        assert float(qt.scales[1, 1].astype(jnp.float32)) == 0.0
    z = quantize(jnp.zeros((2, B, 5)), fmt)
    assert np.all(np.asarray(dequantize(z)) == 0) and np.all(np.asarray(z.tensor_scale) == 1.0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_rejected(bad):
    w = np.ones((32, 4), np.float32)
    w[3, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize(jnp.asarray(w), "nvfp4")
    with pytest.raises(Exception, match="non-finite"):  # under jit: raised when the computation runs
        jax.block_until_ready(jax.jit(quantize, static_argnums=1)(jnp.asarray(w), "mxfp4"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown FP4 format"):
        quantize(jnp.ones((16, 4)), "fp4")
    with pytest.raises(ValueError, match=r"\[\.\.\., K, N\]"):
        quantize(jnp.ones((16,)), "nvfp4")


def test_pytree_jit_and_bf16_input():
    w = jax.random.normal(jax.random.key(0), (2, 48, 16), jnp.bfloat16)
    qt = quantize(w, "nvfp4")
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 3
    qt2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert qt2.fmt == "nvfp4" and qt2.shape == (2, 48, 16)
    d_jit = jax.jit(dequantize)(qt)
    np.testing.assert_array_equal(np.asarray(d_jit), np.asarray(dequantize(qt)))
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize, static_argnums=1)(w, "nvfp4").codes),
                                  np.asarray(qt.codes))
    err = np.abs(np.asarray(dequantize(qt)) - np.asarray(w, np.float32)).max()
    assert err <= np.abs(np.asarray(w, np.float32)).max() / 6 * 1.07


def test_nbytes_fp4_vs_bf16():
    K, N = 7168, 2048  # a DeepSeek-V3 expert projection
    for fmt, expect in [("nvfp4", 0.5 + 1 / 16), ("mxfp4", 0.5 + 1 / 32)]:
        ratio = fp4_nbytes((K, N), fmt) / (K * N * 2)
        assert ratio <= 0.3 and abs(ratio - expect / 2) < 1e-6
    qt = quantize(jnp.ones((3, 40, 24)), "nvfp4")
    assert qt.nbytes == fp4_nbytes((3, 40, 24), "nvfp4") == 3 * (24 * 24 + 3 * 24 + 4)


def test_from_nvfp4_checkpoint_layout():
    """A ModelOpt-style [out, in/2] weight (even input element in the low nibble) + [out, in/16] e4m3 scales +
    weight_scale_2, built here in numpy from the NVFP4 definition, dequantizes to the same [in, out] matrix."""
    rng = np.random.default_rng(5)
    N, K = 6, 48
    codes_NK = rng.integers(0, 16, (N, K)).astype(np.uint8)
    weight = codes_NK[:, 0::2] | (codes_NK[:, 1::2] << 4)
    scale_NKb = rng.uniform(0.01, 400, (N, K // 16)).astype(ml_dtypes.float8_e4m3fn)
    ws2 = np.float32(0.0123)
    vals = np.where(codes_NK & 8, -1.0, 1.0) * GRID[codes_NK & 7]
    expect_NK = vals * np.repeat(scale_NKb.astype(np.float64), 16, axis=1) * ws2
    qt = from_nvfp4_checkpoint(jnp.asarray(weight), jnp.asarray(scale_NKb), jnp.asarray(ws2))
    assert qt.shape == (K, N)
    np.testing.assert_allclose(np.asarray(dequantize(qt)), expect_NK.T, rtol=1e-6)
