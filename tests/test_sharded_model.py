"""The tiny DeepSeek-V3 under sharding equals the single-device model (fp32), on fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import model
from model.cache import ContiguousCache
from model.expert_parallel import ExpertParallel
from model.moe import routed_experts
from sharding import DECODE_RULES, PREFILL_RULES, Topology, data_sharding, place

TOL = 1e-5


def _model(cfg):
    """Random weights, scaled up so that routing is decisive and the experts matter to the logits."""
    m = model.DeepseekV3(cfg, rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(m):
        if isinstance(var, nnx.Param) and var.get_value().ndim >= 2:
            var.set_value(var.get_value() * (25.0 if path[-1] == "gate" else 3.0))
    return m


@pytest.fixture(scope="session")
def cfg():
    return model.preset("tiny")


@pytest.fixture(scope="session")
def reference(cfg):
    return _model(cfg)


@pytest.fixture(scope="session")
def tokens(cfg):
    return jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size, dtype=jnp.int32)


@pytest.fixture(scope="session")
def ref_logits(reference, tokens):
    return jax.jit(lambda m, t: m(t))(reference, tokens)


def _mesh(dp=1, ep=1, tp=1):
    return Topology.preset("cpu:8/1").allocate("test", dp=dp, ep=ep, tp=tp)


def _forward(m, tokens, mesh, rules):
    tokens = jax.device_put(tokens, data_sharding(("batch", "seq"), tokens.shape, mesh, rules))
    return jax.jit(lambda m, t: m(t))(m, tokens)


def test_routing_is_not_degenerate(reference, tokens):
    x_ND = reference.embed(tokens).reshape(-1, reference.cfg.hidden_size)
    _, idx, _ = reference.layers[1].mlp.router(x_ND)
    assert len(np.unique(np.asarray(idx))) == reference.cfg.n_routed_experts


@pytest.mark.parametrize("dp,ep,tp,rules", [
    (1, 1, 2, DECODE_RULES),                              # TP only: no expert dispatch
    (1, 2, 4, DECODE_RULES), (1, 4, 2, DECODE_RULES),     # ep=2 with tp=4, ep=4 with tp=2
    (1, 8, 1, DECODE_RULES), (2, 4, 1, DECODE_RULES),     # ep=8; dp x ep
    (2, 2, 2, PREFILL_RULES),                             # the prefill layout (sequence over ep)
], ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_sharded_forward_equals_single_device(reference, tokens, ref_logits, dp, ep, tp, rules):
    mesh = _mesh(dp, ep, tp)
    # Capacity = worst case here, so these runs take the all_to_all capacity path (the fallback has its own test).
    m = place(reference, mesh, rules, capacity_factor=8.0)
    moe, ep_dispatch = m.layers[1].mlp, m.runtime.expert_parallel
    if ep > 1:
        n = ep_dispatch.rows_per_device(tokens.size)
        assert ep_dispatch.capacity(tokens.size, 8, 2) == n * min(2, 8 // ep_dispatch.n_shards)  # worst case
    assert moe.experts_gate_proj[...].sharding.spec == rules.spec(("experts", "embed", "expert_mlp"), mesh)
    assert m.layers[0].self_attn.q_b_proj[...].sharding.spec == (P(None, "tp", None) if tp > 1 else P(None, None, None))
    assert isinstance(ep_dispatch, ExpertParallel) == (ep * dp > 1 or tp > 1)   # tp only: tensor-parallel experts
    expert_shards = int(np.prod([mesh.shape[a] for a in rules.mesh_axes("experts")]))
    assert ep_dispatch is None or ep_dispatch.n_shards == expert_shards   # decode: wide EP over dp x ep
    assert reference.runtime.expert_parallel is None  # placing copies: the reference stays as it was
    out = _forward(m, tokens, mesh, rules)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_logits), atol=TOL, rtol=0)


def _routed_inputs(reference, n_tokens, seed):
    moe = reference.layers[1].mlp
    x_ND = jax.random.normal(jax.random.key(seed), (n_tokens, reference.cfg.hidden_size))
    w_NX, idx_NX, _ = moe.router(x_ND)
    weights = (moe.experts_gate_proj[...], moe.experts_up_proj[...], moe.experts_down_proj[...])
    return x_ND, w_NX, idx_NX, weights


@pytest.mark.parametrize("local", ["grouped", "segment"])
def test_ep_capacity_path_is_exact_for_balanced_routing(reference, local):
    x_ND, w_NX, _, weights = _routed_inputs(reference, 32, seed=2)
    E, X = reference.cfg.n_routed_experts, reference.cfg.num_experts_per_tok
    idx_NX = (jnp.arange(32 * X).reshape(32, X) % E).astype(jnp.int32)    # every bucket exactly at the mean
    d = ExpertParallel(_mesh(ep=4), capacity_factor=1.0, local_impl=local)
    assert d.bucket_loads(idx_NX, E).max() == d.capacity(32, E, X)         # full, not over
    out = jax.jit(d)(x_ND, w_NX, idx_NX, *weights)
    np.testing.assert_allclose(out, routed_experts(x_ND, w_NX, idx_NX, *weights), atol=TOL, rtol=0)


@pytest.mark.parametrize("local", ["grouped", "segment"])
def test_ep_overflow_falls_back_and_drops_no_token(reference, local):
    x_ND, w_NX, _, weights = _routed_inputs(reference, 32, seed=3)
    E, X = reference.cfg.n_routed_experts, reference.cfg.num_experts_per_tok
    idx_NX = jnp.tile(jnp.array([[0, 1]], jnp.int32), (32, 1))             # every copy to expert shard 0
    d = ExpertParallel(_mesh(ep=8), capacity_factor=1.0, local_impl=local)
    assert d.bucket_loads(idx_NX, E).max() > d.capacity(32, E, X)          # the capacity path would drop
    out = jax.jit(d)(x_ND, w_NX, idx_NX, *weights)
    np.testing.assert_allclose(out, routed_experts(x_ND, w_NX, idx_NX, *weights), atol=TOL, rtol=0)


def test_model_with_tiny_capacity_still_equals_single_device(reference, tokens, ref_logits):
    mesh = _mesh(ep=4, tp=2)
    m = place(reference, mesh, DECODE_RULES, capacity_factor=0.05)
    d = m.runtime.expert_parallel
    assert d.local_impl == "segment"                  # XLA:CPU: the local experts loop over live items
    # 8 rows per device send 16 copies into 4 buckets of capacity 1: every MoE layer overflows.
    assert d.capacity(tokens.size, 8, 2) == 1 and d.rows_per_device(tokens.size) * 2 > d.n_shards * 1
    np.testing.assert_allclose(np.asarray(_forward(m, tokens, mesh, DECODE_RULES)), np.asarray(ref_logits),
                               atol=TOL, rtol=0)


def test_token_count_not_divisible_by_shards_is_padded(reference):
    x_ND, w_NX, idx_NX, weights = _routed_inputs(reference, 13, seed=4)
    d = ExpertParallel(_mesh(dp=2, ep=4))
    out = jax.jit(d)(x_ND, w_NX, idx_NX, *weights)
    assert out.shape == x_ND.shape
    np.testing.assert_allclose(out, routed_experts(x_ND, w_NX, idx_NX, *weights), atol=TOL, rtol=0)


def _decode_fn(graphdef, params, tokens_B, positions_B, cache):
    m = nnx.merge(graphdef, params)
    logits, _, cache = m.forward(tokens_B[:, None], positions_B[:, None], cache=ContiguousCache(), state=cache,
                                 absorbed=True)
    return logits[:, 0], cache


def test_ep_decode_step_lowers_to_all_to_all_and_matches(reference, cfg):
    mesh = _mesh(dp=2, ep=4)
    m = place(reference, mesh, DECODE_RULES)
    B, S = 8, 16
    cache = jax.random.normal(jax.random.key(5), (cfg.num_hidden_layers, B, S, cfg.cache_width))
    toks = jnp.arange(B, dtype=jnp.int32) * 7
    pos = jnp.full((B,), 5, jnp.int32)
    step = jax.jit(_decode_fn, static_argnums=0)
    graphdef, params = nnx.split(m)
    cache_s = jax.device_put(cache, data_sharding((None, "batch", None, None), cache.shape, mesh, DECODE_RULES))
    toks_s = jax.device_put(toks, data_sharding(("batch",), toks.shape, mesh, DECODE_RULES))
    lowered = step.lower(graphdef, params, toks_s, pos, cache_s).as_text()
    assert "all_to_all" in lowered
    logits, new_cache = step(graphdef, params, toks_s, pos, cache_s)
    ref_graphdef, ref_params = nnx.split(reference)
    ref_logits, ref_cache = step(ref_graphdef, ref_params, toks, pos, cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(new_cache), np.asarray(ref_cache), atol=TOL, rtol=0)


@pytest.mark.parametrize("factor", [2.0, 0.05])
def test_hierarchical_dispatch_equals_local_experts(reference, factor):
    """Stage 1 over the domain axis (dp), stage 2 over ep inside it: the same sums as the local path, on the
    capacity path and (factor 0.05: every stage-2 bucket overflows) on the exact fallback."""
    x_ND, w_NX, idx_NX, weights = _routed_inputs(reference, 24, seed=6)
    mesh = _mesh(dp=2, ep=4)
    flat = ExpertParallel(mesh, axis=("dp", "ep"), capacity_factor=factor)
    hier = ExpertParallel(mesh, axis=("dp", "ep"), capacity_factor=factor, domain_axis="dp")
    want = routed_experts(x_ND, w_NX, idx_NX, *weights)
    for d in (flat, hier):
        np.testing.assert_allclose(jax.jit(d)(x_ND, w_NX, idx_NX, *weights), want, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="domain_axis"):
        ExpertParallel(mesh, axis=("dp", "ep"), domain_axis="ep")
