"""Orbax round trip of a loaded model, resharding onto a different mesh on restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import model
from checkpoints import orbax_io
from model.expert_parallel import ExpertParallel
from sharding import DECODE_RULES, PREFILL_RULES, Topology, logical_sharding, place


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved from an ep=4 mesh (devices 0-3); returns (path, host copy of its weights)."""
    cfg = model.preset("tiny")
    m = model.DeepseekV3(cfg, rngs=nnx.Rngs(7))
    host = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))
    topo = Topology.preset("cpu:8/2")
    m = place(m, topo.allocate("prefill", ep=4), PREFILL_RULES)
    path = tmp_path_factory.mktemp("orbax") / "tiny"
    orbax_io.save(m, path)
    return path, host


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_restore_onto_another_mesh_reshards_and_keeps_values(saved):
    path, host = saved
    mesh = Topology.preset("cpu:8/2").allocate("decode", dp=2, ep=2, tp=2)
    m = orbax_io.restore(path, mesh=mesh, rules=DECODE_RULES)
    got = _flat(nnx.to_pure_dict(nnx.state(m)))
    want = _flat(host)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
    experts = m.layers[1].mlp.experts_gate_proj[...]
    assert experts.sharding.mesh == mesh
    assert experts.sharding.spec == DECODE_RULES.spec(("experts", "embed", "expert_mlp"), mesh)
    assert m.layers[0].self_attn.o_proj[...].sharding == logical_sharding(("heads", "v_head", "embed"), mesh)
    assert isinstance(m.runtime.expert_parallel, ExpertParallel)


def test_restored_model_computes_what_the_saved_one_did(saved):
    path, host = saved
    cfg = model.preset("tiny")
    ref = model.DeepseekV3(cfg, rngs=nnx.Rngs(7))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size, dtype=jnp.int32)
    mesh = Topology.preset("cpu:8/1").allocate("decode", tp=4)
    m = orbax_io.restore(path, cfg, mesh=mesh, rules=DECODE_RULES)
    fwd = jax.jit(lambda m, t: m(t))
    np.testing.assert_allclose(np.asarray(fwd(m, tokens)), np.asarray(fwd(ref, tokens)), atol=1e-5, rtol=0)


def test_restore_without_mesh_and_from_stored_config(saved):
    path, host = saved
    m = orbax_io.restore(path)
    assert m.cfg == model.preset("tiny") and m.runtime.expert_parallel is None
    np.testing.assert_array_equal(np.asarray(m.embed_tokens[...]), host["embed_tokens"])


def test_save_refuses_existing_directory_and_restore_a_missing_one(saved, tmp_path):
    path, _ = saved
    m = orbax_io.restore(path)
    with pytest.raises(FileExistsError, match="already exists"):
        orbax_io.save(m, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        orbax_io.restore(tmp_path / "nope")


def test_restore_into_a_different_architecture_fails_clearly(saved):
    path, _ = saved
    other = model.preset("tiny").replace(num_hidden_layers=2)
    with pytest.raises(ValueError, match="does not match"):
        orbax_io.restore(path, other)


def test_hf_checkpoint_loads_onto_shardings_and_round_trips_to_another_mesh(tmp_path):
    pytest.importorskip("transformers")
    import checkpoints
    import hf_reference

    hf_dir = tmp_path / "hf"
    hf_reference.build(str(hf_dir), seed=5)
    topo = Topology.preset("cpu:8/2")
    prefill = topo.allocate("prefill", ep=2, tp=2)
    m = checkpoints.load(hf_dir, dtype=jnp.float32, mesh=prefill, rules=PREFILL_RULES)
    for path, var in nnx.iter_graph(m):                       # every weight already on its own sharding
        if isinstance(var, nnx.Variable):
            want = logical_sharding(var.get_metadata().get("axes"), prefill, PREFILL_RULES)
            assert var.get_value().sharding == want, path
    plain = checkpoints.load(hf_dir, dtype=jnp.float32)
    orbax_io.save(m, tmp_path / "orbax")
    decode = topo.allocate("decode", dp=2, ep=2)
    r = orbax_io.restore(tmp_path / "orbax", mesh=decode, rules=DECODE_RULES)
    assert r.layers[1].mlp.experts_up_proj[...].sharding.mesh == decode
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, m.cfg.vocab_size, (4, 6)), jnp.int32)
    fwd = jax.jit(lambda m, t: m(t))
    np.testing.assert_allclose(np.asarray(fwd(r, tokens)), np.asarray(fwd(plain, tokens)), atol=1e-5, rtol=0)
