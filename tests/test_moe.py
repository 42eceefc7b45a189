"""Every routed-expert implementation (the ragged/sorted grouped one included) equals an independent per-token
float64 numpy loop, plain and quantized, including the capacity path's overflow fallback; the engine picks one per
shape and says which."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.moe import MOE_IMPLS, _LOCAL_IMPLS, capacity, choose_moe_impl, routed_experts
from pallas_kernels import formats, fp8

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)


def _inputs(N, E=8, X=2, D=32, F=16, seed=0, skew=False):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    idx = np.stack([rng.choice(E, X, replace=False) for _ in range(N)])
    if skew:
        idx[:, 0] = 0                                         # every token picks expert 0: over capacity
    return r(N, D), jnp.asarray(rng.random((N, X)), jnp.float32), jnp.asarray(idx, jnp.int32), \
        r(E, D, F) / 6, r(E, D, F) / 6, r(E, F, D) / 4


def numpy_experts(x, w, idx, g, u, d) -> np.ndarray:
    """The definition, token by token in float64: out[n] = sum_k w[n, k] * down_e(silu(x gate_e) * (x up_e)), e =
    idx[n, k]. Shares no code with the model (no sort, no grouping, no jax)."""
    x, w, g, u, d = (np.asarray(a, np.float64) for a in (x, w, g, u, d))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for k, e in enumerate(np.asarray(idx)[n]):
            h = x[n] @ g[e]
            out[n] += w[n, k] * ((h / (1 + np.exp(-h))) * (x[n] @ u[e])) @ d[e]
    return out


def test_the_numpy_reference_catches_a_wrong_expert():
    """Control: routing one token copy to the wrong expert is visible against the reference."""
    x, w, idx, g, u, d = _inputs(13)
    bad = np.asarray(idx).copy()
    bad[3, 0] = (bad[3, 0] + 1) % 8
    if bad[3, 0] == bad[3, 1]:
        bad[3, 0] = (bad[3, 0] + 1) % 8
    got = np.asarray(routed_experts(x, w, jnp.asarray(bad), g, u, d))
    assert np.abs(got - numpy_experts(x, w, idx, g, u, d)).max() > 1e-3


@pytest.mark.parametrize("impl", MOE_IMPLS)
@pytest.mark.parametrize("N,skew", [(1, False), (13, False), (40, True)])
def test_every_implementation_equals_the_reference(impl, N, skew):
    x, w, idx, g, u, d = _inputs(N, skew=skew)
    if skew:
        assert (idx == 0).sum() > capacity(idx.size, 8)       # the capacity path must fall back here
    ref = numpy_experts(x, w, idx, g, u, d)
    got = jax.jit(_LOCAL_IMPLS[impl])(x, w, idx, g, u, d)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", MOE_IMPLS)
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_every_implementation_takes_quantized_experts(impl, quant):
    x, w, idx, g, u, d = _inputs(9, D=32, F=32)
    if quant == "fp8":
        q = lambda a: fp8.quantize(a, lead=1, block=(16, 16))
        deq = fp8.dequantize
    else:
        q = lambda a: formats.quantize(a, "nvfp4")
        deq = formats.dequantize
    qg, qu, qd = q(g), q(u), q(d)
    ref = numpy_experts(x, w, idx, deq(qg), deq(qu), deq(qd))
    got = jax.jit(_LOCAL_IMPLS[impl])(x, w, idx, qg, qu, qd)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)


def test_choice_follows_the_shape_and_platform():
    cfg = lambda D, E, X: ModelConfig(hidden_size=D, moe_intermediate_size=D // 2, n_routed_experts=E,
                                      num_experts_per_tok=X, n_group=1, topk_group=1)
    assert choose_moe_impl(cfg(512, 64, 8), 1, "cpu") == "gather"        # 8 copies, 64 experts: gather them
    # 512 copies of 64 experts: padded buckets; the segment loop's per-item weight copies cost more (2-core Zen 4:
    # capacity 8.8 ms, segment 11.1 ms a layer)
    assert choose_moe_impl(cfg(512, 64, 8), 64, "cpu") == "capacity"
    # ... but experts that fit a core's L2 (0.4 MB here) copy at cache speed: 256 copies of 8 stay on segment (the
    # shipped model's 0.3 MB experts at 128 rows: segment 0.95 vs capacity 1.24 ms a layer)
    assert choose_moe_impl(cfg(256, 8, 2), 128, "cpu") == "segment"
    assert choose_moe_impl(cfg(128, 8, 2), 1, "cpu") == "gather"         # 2 copies of 8 experts: gather them
    assert choose_moe_impl(cfg(128, 8, 2), 4, "cpu") == "dense"          # 8 copies, 8 small experts: all of them
    assert choose_moe_impl(cfg(512, 64, 8), 4, "cpu") == "segment"       # 32 copies but 50 MB to gather: not;
    # ~26 of 64 experts live: their tiles only (dense would run all 64)
    assert choose_moe_impl(cfg(128, 8, 2), 64, "cpu") == "capacity"      # 128 copies of 8 experts: padded buckets
    assert choose_moe_impl(cfg(512, 64, 8), 64, "cuda") == "ragged"      # GPUs: the grouped kernel
