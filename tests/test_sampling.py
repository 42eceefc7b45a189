"""The compiled sampler: plain temperature sampling skips the vocabulary sort and keeps the same distribution."""

import jax
import jax.numpy as jnp
import numpy as np

from serving.sampling import _restricted_probs, token_probs


def test_plain_temperature_probs_equal_the_sorted_path_with_no_restriction():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4096)) * 3, jnp.float32)
    T = jnp.asarray([1.0, 0.7, 1.3, 1.0, 2.0, 0.5], jnp.float32)
    off_k, off_p = jnp.zeros(6, jnp.int32), jnp.ones(6, jnp.float32)
    plain = np.asarray(jax.jit(token_probs)(logits, T, off_k, off_p))
    sorted_path = np.asarray(_restricted_probs(logits / T[:, None], off_k, off_p))
    # the sorted path with top_p = 1 cuts the far tail where the f32 cumulative sum reaches 1.0 (rounding): those
    # entries are all tiny; everything else is the same distribution
    cut = (sorted_path == 0) & (plain > 0)
    assert plain[cut].max(initial=0) < 1e-7 and plain[cut].sum() < 1e-5
    np.testing.assert_allclose(plain[~cut], sorted_path[~cut], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(plain.sum(-1), 1.0, rtol=1e-5)
    assert (plain > 0).all()


def test_a_restricted_row_still_gets_its_support_cut_in_a_mixed_batch():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 512)), jnp.float32)
    probs = np.asarray(jax.jit(token_probs)(logits, jnp.ones(2), jnp.asarray([0, 5], jnp.int32), jnp.ones(2)))
    assert (probs[0] > 0).sum() == 512 and (probs[1] > 0).sum() == 5
