"""Block-FP8 weights (DeepSeek's release format) kept in FP8 on device: format, W8A16 kernels, loading, meshes.

Specification: an FP8 checkpoint loads with its linears as `Fp8Tensor`s (e4m3 codes + f32 block scales) whose
logits equal the model with the same weights dequantized (f32: to rounding; bf16: within bf16 tolerance); the
Pallas kernels (interpreter on CPU) equal the XLA path, inside the expert-parallel shard_map and on TP meshes
(where they run on the local shards: the partitioned program all-gathers no quantized weight); a CUDA export of
a decode step carries the Triton kernels.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
import hf_reference
from model.runtime import Runtime
from pallas_kernels import fp8
from pallas_kernels.compat import lower_for_cuda
from pallas_kernels.fp8 import Fp8Tensor
from serving.config import parse_mesh_spec
from sharding import DECODE_RULES, PREFILL_RULES, Topology, data_sharding
from sharding.rules import RulesError

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)

# Dims that split over tp=2 in whole 16-blocks: q_b N = 4 x 32, kv_b N = 4 x 32, o_proj K = 4 x 16, experts F = 32.
CFG = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, kv_lora_rank=32,
           q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=128)
IDS = jnp.asarray(np.random.default_rng(7).integers(0, hf_reference.BASE["vocab_size"], (2, 12)), jnp.int32)
_fwd = jax.jit(lambda m, t: m(t))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("fp8_src"))
    hf_reference.build(src, CFG, seed=3, with_mtp=True)
    dst = str(tmp_path_factory.mktemp("fp8_ckpt"))
    n = hf_reference.to_block_fp8(src, dst, block=16)
    assert n > 20
    return src, dst


def _mesh(spec):
    return Topology.preset("cpu:8/1").allocate("fp8-" + spec, **parse_mesh_spec(spec))


# ---- format ---------------------------------------------------------------------------------------------------
def test_quantize_round_trip_and_checkpoint_layout():
    w = np.random.default_rng(0).standard_normal((200, 130)).astype(np.float32) * 3
    q = fp8.quantize(w)
    assert q.codes.dtype == jnp.float8_e4m3fn and q.scales.shape == (2, 2) and q.nbytes == 200 * 130 + 4 * 4
    err = np.abs(np.asarray(fp8.dequantize(q)) - w) / np.abs(w).max()
    assert err.max() < 2 ** -4 and np.isfinite(np.asarray(fp8.dequantize(q))).all()   # e4m3: 3 mantissa bits
    # DeepSeek's stored [out, in] tensors map onto the layout by a transpose: same values, no re-quantization
    codes, s = hf_reference.quantize_block_fp8(w.T, 128)
    from_ckpt = fp8.from_checkpoint(codes, s, (200, 130))
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(from_ckpt)),
                                  checkpoints.dequantize_block_fp8(codes, s, (128, 128), "w").T)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_matmuls_equal_the_dequantized_weight(impl):
    rng = np.random.default_rng(1)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    w2, w3 = fp8.quantize(r(160, 96), block=(32, 32)), fp8.quantize(r(4, 160, 96), lead=1, block=(32, 32))
    x = r(5, 160)
    np.testing.assert_allclose(fp8.fp8_matmul(x, w2, impl=impl), x @ fp8.dequantize(w2), rtol=2e-5, atol=2e-5)
    sizes = jnp.array([3, 0, 6, 2], jnp.int32)                  # ragged groups, an empty one, rows past the total
    xg = r(13, 160)
    ref = jax.lax.ragged_dot(xg, fp8.dequantize(w3), sizes)
    np.testing.assert_allclose(fp8.fp8_grouped_matmul(xg, w3, sizes, impl=impl), ref, rtol=2e-5, atol=2e-5)
    xb = r(4, 7, 160)
    np.testing.assert_allclose(fp8.fp8_batched_matmul(xb, w3, impl=impl),
                               jnp.einsum("eck,ekn->ecn", xb, fp8.dequantize(w3)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bm", [16, 128])
def test_every_row_tile_of_the_table_computes_the_same(bm):
    """The tile table's smallest (decode) and largest (prefill, two warpgroups) row tiles, forced on ragged
    groups that straddle tile edges."""
    rng = np.random.default_rng(2)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    w3 = fp8.quantize(r(3, 64, 48), lead=1, block=(32, 16))
    sizes = jnp.array([70, 0, 131], jnp.int32)
    xg = r(210, 64)
    ref = jax.lax.ragged_dot(xg, fp8.dequantize(w3), sizes)
    got = fp8.fp8_grouped_matmul(xg, w3, sizes, impl="pallas_interpret", bm=bm)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    assert fp8._tiles(300, 2048, (128, 128)) == (128, 128, 128, 8) and fp8._tiles(8, 2048, (128, 128))[0] == 16


def test_kernels_lower_for_cuda_at_real_dims():
    w = fp8.abstract((256, 7168, 2048), lead=1)                  # V3 routed experts gate/up
    x = jax.ShapeDtypeStruct((64, 7168), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((256,), jnp.int32)
    txt = lower_for_cuda(lambda x, w, g: fp8.fp8_grouped_matmul(x, w, g, impl="pallas"), x, w, g)
    assert "__gpu$xla.gpu.triton" in txt and "fp8_block_grouped_matmul" in txt


# ---- loading -----------------------------------------------------------------------------------------------------
def _fp8_leaves(m):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.iter_graph(m)
            if isinstance(v, nnx.Variable) and isinstance(v.get_value(), Fp8Tensor)}


def test_fp8_checkpoint_stays_fp8_and_equals_the_dequantized_model(ckpts):
    _, dst = ckpts
    kept = checkpoints.load(dst, dtype=jnp.float32)
    deq = checkpoints.load(dst, dtype=jnp.float32, keep_fp8=False)
    leaves = _fp8_leaves(kept)
    assert "layers.1.mlp.experts_gate_proj" in leaves and "layers.0.self_attn.o_proj" in leaves
    assert "layers.0.self_attn.qkv_a_proj" in leaves   # HF's q_a and kv_a blocks, concatenated (codes and scales)
    assert "mtp.0.block.mlp.experts_down_proj" in leaves and "layers.1.mlp.gate" not in leaves  # router stays f32
    assert not _fp8_leaves(deq)
    np.testing.assert_allclose(np.asarray(_fwd(kept, IDS)), np.asarray(_fwd(deq, IDS)), rtol=0, atol=2e-4)
    # bf16 compute: within bf16 tolerance of the dequantized bf16 model
    kept16 = checkpoints.load(dst, dtype=jnp.bfloat16)
    deq16 = checkpoints.load(dst, dtype=jnp.bfloat16, keep_fp8=False)
    a, b = np.asarray(_fwd(kept16, IDS)), np.asarray(_fwd(deq16, IDS))
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()


def test_fused_q_kv_a_whose_parts_share_a_scale_block_is_dequantized(ckpts, tmp_path):
    """q_a (32 rows) and kv_a (48) in 24-row blocks: q_a's last block is partial, so the two blocks' codes cannot
    be one FP8 matrix; the fused weight loads dequantized (the others stay FP8) and the model equals keep_fp8=False."""
    src, _ = ckpts
    hf_reference.to_block_fp8(src, str(tmp_path), block=24)
    kept = checkpoints.load(str(tmp_path), dtype=jnp.float32)
    leaves = _fp8_leaves(kept)
    assert "layers.0.self_attn.o_proj" in leaves and "layers.0.self_attn.qkv_a_proj" not in leaves
    deq = checkpoints.load(str(tmp_path), dtype=jnp.float32, keep_fp8=False)
    np.testing.assert_allclose(np.asarray(_fwd(kept, IDS)), np.asarray(_fwd(deq, IDS)), rtol=0, atol=2e-4)


@pytest.mark.parametrize("spec,rules", [("ep=2,tp=2", DECODE_RULES), ("tp=2", PREFILL_RULES),
                                        ("dp=2,ep=4", DECODE_RULES)], ids=["ep2tp2", "tp2", "dp2ep4"])
def test_sharded_fp8_equals_unsharded_with_the_kernels(ckpts, spec, rules):
    _, dst = ckpts
    ref = np.asarray(_fwd(checkpoints.load(dst, dtype=jnp.float32), IDS))
    mesh = _mesh(spec)
    m = checkpoints.load(dst, dtype=jnp.float32, mesh=mesh, rules=rules,
                         runtime=Runtime(matmul_impl="pallas_interpret"))
    w = m.layers[1].mlp.experts_down_proj.get_value()
    assert isinstance(w, Fp8Tensor) and w.codes.sharding.spec == rules.spec(("experts", "expert_mlp", "embed"), mesh)
    t = jax.device_put(IDS, data_sharding(("batch", "seq"), IDS.shape, mesh, rules))
    np.testing.assert_allclose(np.asarray(_fwd(m, t)), ref, rtol=0, atol=2e-4)


_GATHER_OF_QUANTIZED = re.compile(r"= (u8|f8e4m3fn)\[[^\]]*\][^ ]* all-gather")


@pytest.mark.parametrize("quant", ["fp8", "nvfp4+dense"])
def test_tp_mesh_runs_the_kernels_on_local_shards(ckpts, quant):
    """On a tp=2 mesh the quantized dense MLP, shared and routed experts run their kernels inside shard_map:
    the partitioned program all-gathers no quantized weight (codes are u8 / f8e4m3fn)."""
    src, dst = ckpts
    mesh = _mesh("tp=2")
    kw = dict(quant="nvfp4+dense") if quant != "fp8" else {}
    path = dst if quant == "fp8" else src
    m = checkpoints.load(path, dtype=jnp.float32, mesh=mesh, rules=PREFILL_RULES,
                         runtime=Runtime(matmul_impl="pallas_interpret"), **kw)
    t = jax.device_put(IDS, data_sharding(("batch", "seq"), IDS.shape, mesh, PREFILL_RULES))
    hlo = _fwd.lower(m, t).compile().as_text()
    assert "all-gather" in hlo or "all-reduce" in hlo            # it is a partitioned program
    assert not _GATHER_OF_QUANTIZED.search(hlo)
    ref = checkpoints.load(path, dtype=jnp.float32, **kw)
    np.testing.assert_allclose(np.asarray(_fwd(m, t)), np.asarray(_fwd(ref, IDS)), rtol=0, atol=2e-4)


def test_a_kernel_outside_shard_map_would_gather_its_weight():
    """The control for the test above: the same kernel under plain GSPMD on a tp-split weight all-gathers it."""
    mesh = _mesh("tp=2")
    w = fp8.quantize(jnp.ones((64, 128)), block=(16, 16))
    w = jax.device_put(w, Fp8Tensor(NamedSharding(mesh, P(None, "tp")), NamedSharding(mesh, P(None, "tp")),
                                    w.shape, 0, 1, w.block))
    hlo = jax.jit(lambda x, w: fp8.fp8_matmul(x, w, impl="pallas_interpret")).lower(jnp.ones((4, 64)), w) \
        .compile().as_text()
    assert _GATHER_OF_QUANTIZED.search(hlo)


def test_fp8_blocks_that_do_not_split_whole_are_refused(ckpts):
    _, dst = ckpts
    with pytest.raises(RulesError, match="whole blocks"):
        checkpoints.load(dst, mesh=_mesh("tp=4"), rules=PREFILL_RULES)   # expert FFN 32 over tp=4: 8-row shards
