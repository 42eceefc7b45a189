"""The model's cache contract (`model.cache.KVCache`): layouts declare capabilities, and the model checks them."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.cache import BLOCKWISE_DECODE, BLOCKWISE_PREFILL, KERNEL_DECODE, ContiguousCache, NoCache, check_layout
from model.config import preset
from model.deepseek import DeepseekV3
from model.paged_cache import PagedCache


@dataclasses.dataclass(frozen=True)
class _ClaimsKernel:
    """Declares kernel decode but only implements `update`."""

    capabilities = frozenset({KERNEL_DECODE})

    def update(self, state, layer, kv_BTC, positions_BT):
        return NoCache().update(state, layer, kv_BTC, positions_BT)


def test_plain_layouts_declare_no_capability():
    assert check_layout(NoCache()) == check_layout(ContiguousCache()) == frozenset()


def test_paged_layout_declares_what_it_is_built_for():
    pt, valid = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 2), bool)
    assert check_layout(PagedCache(pt, valid)) == frozenset()
    assert check_layout(PagedCache(pt, valid, kernel="pallas_interpret")) == {KERNEL_DECODE}
    assert check_layout(PagedCache(pt, valid, block_pages=2)) == {BLOCKWISE_PREFILL, BLOCKWISE_DECODE}


def test_a_layout_missing_a_declared_method_is_refused_by_the_model():
    cfg = preset("tiny")
    model = DeepseekV3(cfg)
    toks = jnp.zeros((1, 2), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (1, 2))
    with pytest.raises(TypeError, match="declares 'kernel_decode' but has no write, attend_absorbed"):
        model.forward(toks, pos, cache=_ClaimsKernel(), state=None, absorbed=True)
    with pytest.raises(TypeError, match="is not a model.cache.KVCache"):
        model.forward(toks, pos, cache=object(), state=None)


def test_contiguous_cache_follows_the_contract_through_the_model():
    """Prompt then one cached step with `ContiguousCache` equals the teacher-forced logits (f32)."""
    cfg = preset("tiny")
    model = DeepseekV3(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 6)).astype(np.int32)
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="absorbed")
    def fwd(params, toks, pos, state, absorbed):
        return nnx.merge(graphdef, params).forward(toks, pos, cache=ContiguousCache(), state=state,
                                                   absorbed=absorbed)

    ref = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, jnp.asarray(ids)))
    state = ContiguousCache.init(cfg, 1, 8)
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    _, _, state = fwd(params, jnp.asarray(ids[:, :5]), pos, state, False)
    logits, _, _ = fwd(params, jnp.asarray(ids[:, 5:]), jnp.full((1, 1), 5, jnp.int32), state, True)
    np.testing.assert_allclose(np.asarray(logits)[0, 0], ref[0, 5], atol=1e-4, rtol=1e-4)
