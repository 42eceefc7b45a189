"""The paged MLA decode-attention kernel against the gather reference: ragged lengths (1 token, exactly a page,
a page + 1, many pages), pages in any order, the scratch page in unused page-table entries, bf16 and f32, and a
cuda lowering at DeepSeek-V3's dims.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compat import lower_for_cuda
from pallas_kernels.paged_attention import launch_params, paged_mla_decode


def _case(dtype, seed=0):
    rng = np.random.default_rng(seed)
    layers, P, Z, L, R, B, H, Pw = 3, 24, 16, 64, 16, 6, 8, 7
    cache = rng.standard_normal((layers, P, Z, L + R)).astype(np.float32)
    cache[:, 0] = 1e4                                      # the scratch page: garbage that must never be read
    lengths = np.array([1, 16, 17, 50, 96, 112], np.int32)
    pt = np.zeros((B, Pw), np.int32)                       # unused entries point at the scratch page
    free = list(rng.permutation(np.arange(1, P)))
    for b in range(B):
        for j in range(-(-lengths[b] // Z)):
            pt[b, j] = free.pop()
    ql = rng.standard_normal((B, H, L)).astype(np.float32)
    qr = rng.standard_normal((B, H, R)).astype(np.float32)
    f = lambda x: jnp.asarray(x, dtype)
    return f(ql), f(qr), f(cache), jnp.asarray(pt), jnp.asarray(lengths)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_kernel_equals_the_gather_reference(dtype, tol):
    ql, qr, cache, pt, lengths = _case(dtype)
    ref = paged_mla_decode(ql, qr, cache, 2, pt, lengths, 0.125, impl="xla")
    got = paged_mla_decode(ql, qr, cache, 2, pt, lengths, 0.125, impl="pallas_interpret", block_h=4)
    assert got.shape == ref.shape == (6, 8, 64) and np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=tol, atol=tol)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_context_splits_combine_to_the_reference(splits):
    """Flash-decoding: each split's partial softmax, rescaled to the global max. 7 splits of a 7-page table leave
    the short rows' later splits empty (weight 0); 3 splits do not divide the pages."""
    ql, qr, cache, pt, lengths = _case(jnp.float32, seed=2)
    ref = paged_mla_decode(ql, qr, cache, 1, pt, lengths, 0.125, impl="xla")
    got = paged_mla_decode(ql, qr, cache, 1, pt, lengths, 0.125, impl="pallas_interpret", block_h=8,
                           num_splits=splits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_launch_params_fill_the_gpu_at_small_batch_only():
    assert launch_params(64, 128, 64) == (16, 1)      # 512 programs: already ~4 waves of 132 SMs
    assert launch_params(64, 16, 64) == (16, 8)       # V3 at tp=8, 4k context: 64 -> 512 programs
    assert launch_params(1, 16, 64) == (16, 16)       # 16 splits of 4 pages (the cap on both)
    assert launch_params(1, 16, 24) == (16, 4)        # each split keeps >= 4 pages
    assert launch_params(1, 16, 4) == (16, 1)         # too short to split
    assert launch_params(8, 8, 64, block_h=8, num_splits=3) == (8, 3)


def test_reference_attends_only_to_each_rows_positions():
    """Changing a cache value past a row's length (or in the scratch page) changes nothing; one inside does."""
    ql, qr, cache, pt, lengths = _case(jnp.float32, seed=1)
    base = np.asarray(paged_mla_decode(ql, qr, cache, 0, pt, lengths, 0.125, impl="pallas_interpret"))
    page, off = int(pt[2, 1]), 1                           # row 2 has 17 tokens: position 17 is past its end
    poked = cache.at[0, page, off].add(100.0)
    out = np.asarray(paged_mla_decode(ql, qr, poked, 0, pt, lengths, 0.125, impl="pallas_interpret"))
    np.testing.assert_array_equal(out[2], base[2])
    poked = cache.at[0, page, 0].add(100.0)                # position 16: inside row 2
    out = np.asarray(paged_mla_decode(ql, qr, poked, 0, pt, lengths, 0.125, impl="pallas_interpret"))
    assert np.abs(out[2] - base[2]).max() > 1e-3


def test_kernel_lowers_for_cuda_at_v3_dims():
    sds = jax.ShapeDtypeStruct
    txt = lower_for_cuda(lambda a, b, c, d, e: paged_mla_decode(a, b, c, 3, d, e, 0.1, impl="pallas"),
                         sds((64, 128, 512), jnp.bfloat16), sds((64, 128, 64), jnp.bfloat16),
                         sds((61, 512, 64, 576), jnp.bfloat16), sds((64, 64), jnp.int32), sds((64,), jnp.int32))
    assert "__gpu$xla.gpu.triton" in txt and "paged_mla_decode" in txt
