"""EPLB (`sharding.eplb`): redundant experts placed from routing counts, outputs equal to the model without
them (exact, f32; local and expert-parallel dispatch), moved at run time without recompiling, loaded straight
from a checkpoint, and DeepSeek-V3's real dimensions with 288 expert slots lowered for an ep=8 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
from model.config import preset
from model.deepseek import DeepseekV3
from model.moe import physical_ids, replica_table, uniform_placement
from sharding import DECODE_RULES, Topology, eplb, place
from sharding.plan import weight_bytes_per_device

CFG = preset("tiny").replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)


def _zipf(E: int, s: float = 1.2, seed: int = 0) -> np.ndarray:
    """Tokens per expert with Zipf-like popularity over a shuffled expert order."""
    rank = np.random.default_rng(seed).permutation(E)
    return 10_000 / (rank + 1.0) ** s


def _skewed(model, s: float = 0.6):
    """Bias every MoE layer's routing towards a few experts (the correction bias selects experts)."""
    for i, moe in enumerate(eplb.moe_layers(model)):
        rank = np.random.default_rng(i).permutation(model.cfg.n_routed_experts)
        moe.e_score_correction_bias.set_value(jnp.asarray(-s * np.log1p(rank), jnp.float32))
    return model


def test_placement_balances_a_zipf_load_and_keeps_groups_in_domains():
    E, P, S = 64, 80, 8
    load = _zipf(E)
    flat = eplb.balanced_placement(load, P, S)
    hier = eplb.balanced_placement(load, P, S, n_domains=2, n_groups=8)
    uniform = uniform_placement(E, P)
    for logical in (flat, hier):
        assert logical.shape == (P,) and set(logical.tolist()) == set(range(E))   # every expert has a copy
        assert eplb.imbalance(logical, load, S) < 1.15
        assert np.isclose(eplb.rank_loads(logical, load, S).sum(), load.sum())
    assert eplb.imbalance(uniform, load, S) > 2.0
    # hierarchical: whole groups (8 experts each) inside one domain (ranks 0-3 / 4-7)
    dom = np.repeat(np.arange(2), P // 2)
    for g in range(8):
        assert len(set(dom[np.isin(hier, np.arange(g * 8, g * 8 + 8))].tolist())) == 1
    # the hottest expert got the most copies; no rank holds two copies of one expert where avoidable
    counts = np.bincount(flat, minlength=E)
    assert counts[np.argmax(load)] == counts.max() > 1
    for r in flat.reshape(S, -1):   # (9 copies of the hottest expert over 8 ranks: one rank holds two)
        assert all(c <= 1 or counts[e] > S for e, c in zip(*np.unique(r, return_counts=True)))
    # where pinning groups to domains cannot spread a hot group, the engine's choice falls back to flat
    hot = _zipf(E, s=1.6)
    chosen = eplb.choose_placement(hot, P, S, n_domains=4, n_groups=8)
    assert eplb.imbalance(chosen, hot, S) <= 1.05 * eplb.imbalance(eplb.balanced_placement(hot, P, S), hot, S)
    assert eplb.imbalance(eplb.balanced_placement(hot, P, S, n_domains=4, n_groups=8), hot, S) > 1.2 * \
        eplb.imbalance(chosen, hot, S)
    with pytest.raises(ValueError, match="physical experts"):
        eplb.balanced_placement(load, 60, S)


def test_replica_table_and_physical_ids_spread_rows_over_replicas():
    logical = np.array([0, 1, 2, 3, 0, 0, 2, 1])
    table, counts = replica_table(logical, 4)
    assert counts.tolist() == [3, 2, 2, 1] and sorted(table[0].tolist()[:3]) == [0, 4, 5]
    idx = jnp.zeros((12, 1), jnp.int32)                 # 12 rows all choosing expert 0
    phys = np.asarray(physical_ids(idx, jnp.asarray(table), jnp.asarray(counts)))
    assert np.bincount(phys[:, 0], minlength=8)[[0, 4, 5]].tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="without a replica"):
        replica_table([0, 1, 1, 1], 4)


@pytest.fixture(scope="module")
def skewed():
    model = _skewed(DeepseekV3(CFG, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, 48), 0, CFG.vocab_size)
    return model, tokens, model(tokens)


def _counts(model, tokens) -> np.ndarray:
    """Routing counts [MoE layers, E] of a forward over `tokens` (the MTP layer, not run: a flat row)."""
    _, inter = nnx.capture(lambda m, t: m(t), nnx.Intermediate)(model, tokens)
    rows = [v.get_value() for p, v in nnx.to_flat_state(inter) if p[-1] == "expert_counts"]
    rows = [np.asarray(sum(r) if isinstance(r, tuple) else r) for r in rows]
    rows += [np.ones_like(rows[0])] * (len(eplb.moe_layers(model)) - len(rows))
    return np.stack(rows)


def test_redundant_experts_give_the_same_logits_and_balanced_placements_stay_equal(skewed):
    model, tokens, ref = skewed
    wide = eplb.expand(model, 16)
    assert wide.cfg.n_physical_experts == 32
    # uniform placement: the same weights per token copy, so equal up to summation order — with twice the physical
    # experts the routed-expert dots get other shapes, and XLA:CPU's YNNPACK dots (Zen 4) tile K by shape: the last
    # bit moves (a wrong replica table moves everything)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa: E731
    close(wide(tokens), ref)
    load_LE = _counts(model, tokens)
    assert load_LE.shape == (3, 16) and load_LE[:2].sum() == 2 * 4 * 48 * 4       # 2 MoE layers + MTP's
    rows = [eplb.balanced_placement(c, 32, 8) for c in load_LE]
    eplb.rebalance(wide, rows)
    assert [np.asarray(m.expert_logical[...]).tolist() for m in eplb.moe_layers(wide)] == [r.tolist() for r in rows]
    close(wide(tokens), ref)                                         # moved weights follow their tables
    before = [eplb.imbalance(uniform_placement(16, 32), c, 8) for c in load_LE[:2]]
    after = [eplb.imbalance(r, c, 8) for r, c in zip(rows, load_LE[:2])]
    assert max(after) < 1.3 < min(before), (before, after)


def test_expert_parallel_dispatch_with_replicas_is_exact_and_rebalances_without_recompiling(skewed):
    model, tokens, _ = skewed
    mesh = Topology.preset("cpu:8/1").allocate("eplb-ep8", ep=8)
    run = lambda m: jax.jit(lambda t: m(t))(tokens)                    # noqa: E731
    ref = run(place(model, mesh, DECODE_RULES))                        # the same mesh without redundant experts
    wide = place(eplb.expand(model, 16), mesh, DECODE_RULES)
    assert wide.runtime.expert_parallel is not None
    graph, state = nnx.split(wide)
    fwd = jax.jit(lambda s, t: nnx.merge(graph, s)(t)).lower(state, tokens).compile()
    np.testing.assert_array_equal(np.asarray(fwd(state, tokens)), np.asarray(ref))
    rows = [eplb.balanced_placement(c, 32, 8) for c in _counts(model, tokens)]
    eplb.rebalance(wide, rows)
    new = nnx.state(wide)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new)):      # same shapes and shardings
        assert a.shape == b.shape and a.sharding == b.sharding
    # the executable compiled before the move runs on the moved weights (an AOT executable refuses other layouts)
    np.testing.assert_array_equal(np.asarray(fwd(new, tokens)), np.asarray(ref))


def test_checkpoint_loads_into_redundant_slots(tmp_path):
    hf_reference = pytest.importorskip("hf_reference")
    path = str(tmp_path / "ckpt")
    hf_reference.build(path, seed=3)
    base = checkpoints.load(path, dtype=jnp.float32)
    wide = checkpoints.load(path, dtype=jnp.float32, redundant_experts=base.cfg.n_routed_experts)
    E = base.cfg.n_routed_experts
    for a, b in zip(eplb.moe_layers(base), eplb.moe_layers(wide)):
        w = np.asarray(b.experts_gate_proj[...])
        assert w.shape[0] == 2 * E and np.array_equal(w[E:], np.asarray(a.experts_gate_proj[...]))
        assert np.asarray(b.expert_logical[...]).tolist() == uniform_placement(E, 2 * E).tolist()
    ids = jnp.asarray(np.arange(24).reshape(2, 12) % base.cfg.vocab_size)
    assert jnp.array_equal(wide(ids), base(ids))


def test_v3_real_dims_with_288_expert_slots_on_ep8():
    """DeepSeek-V3's dimensions (one MoE layer, 256 experts + 32 redundant), no weights: 36 slots per device on
    ep=8, and the decode-shaped forward lowers and compiles for the 8-device mesh."""
    v3 = preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate("eplb-v3", ep=8)
    plain = checkpoints.abstract_model(v3, quant="fp8", mesh=mesh, rules=DECODE_RULES)
    wide = checkpoints.abstract_model(v3.replace(n_redundant_experts=32), quant="fp8", mesh=mesh, rules=DECODE_RULES)
    (moe,) = eplb.moe_layers(wide)
    codes = moe.experts_gate_proj.get_value().codes
    assert codes.shape[0] == 288 and codes.sharding.shard_shape(codes.shape)[0] == 36
    extra = weight_bytes_per_device(wide) - weight_bytes_per_device(plain)
    per_expert = 3 * 7168 * 2048 * (1 + 4 / 128 / 128)                    # FP8 codes + block scales
    assert abs(extra - 4 * per_expert) < 0.01 * per_expert + 300_000      # 4 more experts per device (+ tables)
    graph, state = nnx.split(wide)
    tokens = jax.ShapeDtypeStruct((64, 1), jnp.int32)
    low = jax.jit(lambda s, t: nnx.merge(graph, s)(t)).lower(state, tokens)
    assert "all-to-all" in low.compile().as_text()


def test_engine_counts_routing_on_device_and_rebalances_between_steps(skewed, monkeypatch):
    """The executables count every MoE layer's routing (padding rows excluded); with redundant experts and
    `eplb_interval` the engine moves its slots between steps, and greedy tokens stay those of the model without
    redundant experts on the same ep=4 mesh."""
    import dataclasses

    from serving import LLM, EngineConfig, SamplingParams

    model, _, _ = skewed
    prompts = [[(7 * i + j) % CFG.vocab_size for j in range(5 + i)] for i in range(3)]
    sp = SamplingParams(max_tokens=9, temperature=0.0)
    ec = EngineConfig(page_size=16, num_pages=64, max_model_len=128, prefill_buckets=(16,), prefill_rows=(1,),
                      decode_buckets=(4,), decode_windows=(8,), decode_steps=4, expert_stats_interval=2)
    base = LLM(model=model, engine_config=ec, decode_mesh="ep=4")
    ref = [o.token_ids for o in base.generate(prompts, sp)]
    counts = base.decode_engine.expert_stats.counts()
    # prompt tokens + 8 decode steps per request (bucket 4, 3 rows: the padding row not counted), 4 copies each
    assert counts.shape == (3, 16) and counts[:2].sum(1).tolist() == [4 * (sum(map(len, prompts)) + 3 * 8)] * 2
    assert counts[2].sum() == 0                                          # no MTP pass ran
    base.close()
    llm = LLM(model=eplb.expand(model, 16), engine_config=dataclasses.replace(ec, eplb_interval=2, eplb_min_gain=0.0),
              decode_mesh="ep=4")
    eng = llm.decode_engine
    # moving slots frees each layer's old copy as it goes (the engine's params and the merged model share their
    # variables): live device bytes when a layer's move starts stay at the level of the rebalance's first move
    live = lambda: sum(a.nbytes for a in jax.live_arrays())                       # noqa: E731
    seen, gather = [], eplb._gather_slots
    monkeypatch.setattr(eplb, "_gather_slots", lambda ws, src: (seen.append(live()), gather(ws, src))[1])
    layer = sum(x.nbytes for x in jax.tree.leaves(eng.params) if x.ndim == 3 and x.shape[0] == 32) // 3
    assert [o.token_ids for o in llm.generate(prompts, sp)] == ref
    st = eng.expert_stats
    assert st.rebalances >= 1, st.summary()
    assert len(seen) >= 3 and max(seen[i] - seen[i - i % 3] for i in range(len(seen))) < layer // 2, (seen, layer)
    placed = [np.asarray(m.expert_logical[...]) for m in eplb.moe_layers(nnx.merge(eng.graphdef, eng.params))]
    assert any(not np.array_equal(p, uniform_placement(16, 32)) for p in placed)
    assert [o.token_ids for o in llm.generate(prompts, sp)] == ref       # and again on the moved slots
    llm.close()
