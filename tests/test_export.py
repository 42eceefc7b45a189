"""checkpoints.export.save_hf is the exact inverse of checkpoints.load.

Specification: a model saved with `save_hf` and loaded back with `checkpoints.load` has identical weights and logits
(main head and MTP); an HF checkpoint loaded and re-exported gives back the very same tensors (names, layouts,
values); bf16 storage loads as the bf16 cast of the weights with the router kept in float32.
"""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import checkpoints
from checkpoints.export import save_hf
from checkpoints.safetensors_io import Checkpoint
from model import DeepseekV3, preset

IDS = np.random.default_rng(5).integers(0, 512, (2, 12)).astype(np.int32)


def _flat(model):
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def tiny_model():
    """The `tiny` preset (q_lora, yarn, dense + MoE layers, MTP) with O(1) random weights and a random router bias."""
    cfg = preset("tiny")
    model = DeepseekV3(cfg, rngs=nnx.Rngs(11), dtype=jnp.float32)
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        if path[-1] == "weight":  # norms
            var.set_value(jnp.asarray(1 + 0.2 * rng.standard_normal(v.shape), v.dtype))
        elif path[-1] == "e_score_correction_bias":
            var.set_value(jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype))
        else:
            var.set_value(jnp.asarray(rng.standard_normal(v.shape) / np.sqrt(v.shape[-2] if v.ndim > 1 else 1),
                                      v.dtype))
    nnx.update(model, state)
    return model


def _outputs(model):
    ids = jnp.asarray(IDS)
    pos = jnp.broadcast_to(jnp.arange(IDS.shape[1], dtype=jnp.int32), IDS.shape)
    logits, hidden, _ = model.forward(ids, pos)
    mtp, _, _ = model.mtp_forward(hidden, ids, pos)
    return np.asarray(logits), np.asarray(mtp)


def test_round_trip_f32_is_exact(tmp_path, tiny_model):
    tensors = save_hf(tiny_model, tmp_path)
    cfg = tiny_model.cfg
    N = cfg.num_hidden_layers
    # HF names and [out, in] layouts.
    assert tensors["lm_head.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert tensors["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (cfg.hidden_size,
                                                                                cfg.moe_intermediate_size)
    assert tensors[f"model.layers.{N}.eh_proj.weight"].shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    assert f"model.layers.{N}.shared_head.norm.weight" in tensors
    assert tensors["model.layers.0.self_attn.q_b_proj.weight"].shape == (
        cfg.num_attention_heads * cfg.qk_head_dim, cfg.q_lora_rank)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "deepseek_v3"
    loaded = checkpoints.load(tmp_path, dtype=jnp.float32)
    assert loaded.cfg == cfg
    a, b = _flat(tiny_model), _flat(loaded)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for x, y in zip(_outputs(tiny_model), _outputs(loaded)):
        np.testing.assert_array_equal(x, y)


def test_bf16_storage(tmp_path, tiny_model):
    tensors = save_hf(tiny_model, tmp_path, dtype=jnp.bfloat16)
    assert tensors["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    loaded = checkpoints.load(tmp_path, dtype=jnp.bfloat16)
    assert loaded.embed_tokens.get_value().dtype == jnp.bfloat16
    a, b = _flat(tiny_model), _flat(loaded)
    for k in a:
        want = a[k] if k.endswith(("mlp.gate", "e_score_correction_bias")) else a[k].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(b[k]), want, err_msg=k)


def test_hf_checkpoint_reexports_to_the_same_tensors(tmp_path):
    """HF checkpoint (written by transformers, plus a DeepSeek MTP layer) -> load -> save_hf: same tensors."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_reference

    src = tmp_path / "src"
    hf_reference.build(str(src), seed=4, with_mtp=True)
    orig = {k: np.array(v) for k, v in Checkpoint(str(src)).items()}
    model = checkpoints.load(src, dtype=jnp.float32)
    out = save_hf(model, tmp_path / "dst")
    n = model.cfg.num_hidden_layers
    copies = {f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"}
    assert set(out) == set(orig) - copies
    for k, v in out.items():
        np.testing.assert_array_equal(v, orig[k].astype(np.float32), err_msg=k)
    re = checkpoints.load(tmp_path / "dst", dtype=jnp.float32)
    for x, y in zip(_outputs_for(model), _outputs_for(re)):
        np.testing.assert_array_equal(x, y)


def _outputs_for(model):
    ids = jnp.asarray(IDS % model.cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(IDS.shape[1], dtype=jnp.int32), IDS.shape)
    logits, hidden, _ = model.forward(ids, pos)
    mtp, _, _ = model.mtp_forward(hidden, ids, pos)
    return np.asarray(logits), np.asarray(mtp)
