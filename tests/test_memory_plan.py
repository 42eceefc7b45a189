"""Memory plan and real-dims executables: per-device weight bytes from abstract shapes and shardings, KV sizing
from a device-memory budget, and DeepSeek-V3's real dimensions lowered (CPU compile, cuda export with the kernels
inside) without any weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
import hf_reference
from model.config import preset
from model.runtime import Runtime
from serving import LLM, EngineConfig, SamplingParams
from serving.engine import Engine
from sharding import DECODE_RULES, PREFILL_RULES, Topology
from sharding.plan import MemoryPlanError, kv_bytes_per_token, plan, weight_bytes_per_device

V3 = preset("deepseek-v3")


def _leaf_sizes(model):
    _, state = nnx.split(model)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        out[jax.tree_util.keystr(path)] = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return out


def test_weight_bytes_per_device_of_v3_fp8_on_ep8():
    """From shapes alone: every leaf counts fully on each device except the routed-expert leaves, split 8 ways."""
    mesh = Topology.preset("cpu:8/1").allocate("plan-ep8", ep=8)
    placed = checkpoints.abstract_model(V3, quant="fp8", mesh=mesh, rules=DECODE_RULES)
    flat = checkpoints.abstract_model(V3, quant="fp8")
    want = sum(b / (8 if "experts_" in k else 1) for k, b in _leaf_sizes(flat).items())
    got = weight_bytes_per_device(placed)
    assert got == want
    bf16 = weight_bytes_per_device(checkpoints.abstract_model(V3, mesh=mesh, rules=DECODE_RULES))
    assert 1.9 < bf16 / got < 2.0                  # FP8 codes + one f32 scale per 128x128 block (linears)
    assert 100e9 < got < 106e9                     # V3 FP8 at ep=8: ~103 GB per device (docs/BENCHMARKS.md)
    nv = weight_bytes_per_device(checkpoints.abstract_model(V3, quant="nvfp4", fp8_linears=True, mesh=mesh,
                                                            rules=DECODE_RULES))
    assert nv < 0.7 * got                          # FP4 experts


def test_plan_arithmetic_and_refusal():
    kv = kv_bytes_per_token(V3)
    assert kv == 62 * 576 * 2                      # 61 layers + MTP, 512 + 64 latent, bf16
    p = plan(141e9, 103e9, kv, fraction=0.9, temp=2e9, page_size=64)
    assert p.num_pages == int((0.9 * 141e9 - 105e9) // (kv * 64)) and p.kv_tokens == p.num_pages * 64
    with pytest.raises(MemoryPlanError, match="weights take 103.0 GB.*more devices per mesh"):
        plan(80e9, 103e9, kv, fraction=0.9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("plan_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    return path


EC = EngineConfig(page_size=8, num_pages=48, max_model_len=64, prefill_buckets=(16,), decode_buckets=(4,),
                  decode_steps=2, decode_windows=(8,))


def test_kv_cache_sized_from_a_memory_budget(tiny):
    with LLM(tiny, engine_config=EC, kv_memory_fraction=0.5, device_memory_gb=0.05) as llm:
        eng = llm.decode_engine
        weights = weight_bytes_per_device(eng.model)
        page = kv_bytes_per_token(eng.model_cfg, eng.cache.dtype) * EC.page_size
        budget = 0.5 * 0.05e9 - weights
        assert eng.cfg.num_pages - 1 <= budget // page                        # temporaries come off the budget
        assert eng.cfg.num_pages - 1 >= (budget - 50e6) // page               # ... and they are small here
        assert eng.cfg.num_pages > EC.num_pages
        outs = llm.generate([[3, 1, 4]], SamplingParams(max_tokens=4))
        assert len(outs[0].token_ids) == 4
    with pytest.raises(MemoryPlanError, match="does not fit"):
        LLM(tiny, engine_config=EC, kv_memory_fraction=0.5, device_memory_gb=0.0001)
    with pytest.raises(ValueError, match="do not report"):
        LLM(tiny, engine_config=EC, kv_memory_fraction=0.5)


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_v3_dims_decode_exports_for_cuda_with_kernels_and_compiles_for_cpu(quant):
    """DeepSeek-V3's real dimensions (2 of its layers: one dense, one MoE with all 256 experts), no weights:
    the ep=8 decode executable exports for cuda with the FP8 / FP4 Triton kernels inside, and compiles for CPU."""
    cfg = V3.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate(f"v3-{quant}", ep=8)
    ec = EngineConfig(page_size=64, num_pages=9, max_model_len=512, prefill_buckets=(64,), decode_buckets=(16,),
                      decode_steps=1, decode_windows=(8,))
    m = checkpoints.abstract_model(cfg, quant=quant, fp8_linears=True, mesh=mesh, rules=DECODE_RULES,
                                   runtime=Runtime(platform="cuda"))
    eng = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False)
    (exp,) = eng.exported("cuda").values()
    txt = exp.mlir_module()
    assert exp.platforms == ("cuda",) and "__gpu$xla.gpu.triton" in txt and len(exp.serialize()) > 0
    grouped = "fp8_block_grouped_matmul" if quant == "fp8" else "fp4_nvfp4_grouped_matmul"
    assert grouped in txt and "fp8_block_matmul" in txt          # routed experts + the dense / attention linears
    # the same engine lowered for this host (XLA path) compiles
    cpu = checkpoints.abstract_model(cfg, quant=quant, fp8_linears=True, mesh=mesh, rules=DECODE_RULES)
    (low,) = Engine(cpu, ec, mesh=mesh, roles={"decode"}, compile=False).lowered().values()
    assert low.compile().memory_analysis().temp_size_in_bytes > 0
    assert math.isclose(weight_bytes_per_device(m), weight_bytes_per_device(cpu))


def test_v3_dims_batched_prefill_exports_for_cuda():
    """Batched prefill at DeepSeek-V3's real dimensions (one dense + one MoE layer, 256 experts, FP8, tp=8): the
    4-row x 16-token prefill executable exports for cuda with the FP8 kernels inside, next to the 1-row ones, and
    compiles for 8 fake CPU devices."""
    cfg = V3.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate("v3-prefill", tp=8)
    ec = EngineConfig(page_size=64, num_pages=9, max_model_len=512, prefill_buckets=(16, 64), prefill_rows=(1, 4),
                      prefill_tokens=64, decode_buckets=(1,), decode_windows=(8,))
    assert ec.prefill_shapes == ((1, 16), (4, 16), (1, 64))
    m = checkpoints.abstract_model(cfg, quant="fp8", fp8_linears=True, mesh=mesh, rules=PREFILL_RULES,
                                   runtime=Runtime(platform="cuda"))
    exp = Engine(m, ec, mesh=mesh, roles={"prefill"}, compile=False).exported("cuda")
    assert sorted(exp) == [("prefill", 1, 16), ("prefill", 1, 64), ("prefill", 4, 16)]
    four = exp["prefill", 4, 16]
    assert four.platforms == ("cuda",) and "fp8_block_matmul" in four.mlir_module()
    assert {(4, 16), (4, 8)} <= {a.shape for a in four.in_avals}          # tokens 4 x 16, page tables 4 x 8
    # and lowered for this host's 8 fake devices (XLA path), the 4-row executable compiles
    cpu = checkpoints.abstract_model(cfg, quant="fp8", fp8_linears=True, mesh=mesh, rules=PREFILL_RULES)
    low = Engine(cpu, ec, mesh=mesh, roles={"prefill"}, compile=False).lowered()["prefill", 4, 16]
    assert low.compile().memory_analysis().temp_size_in_bytes > 0


def test_batch_limit_is_sized_from_the_kv_pool_at_v3_dims():
    """No decode_buckets given: the batch limit follows the pool (its tokens / 128), capped per platform and
    attention rank — at the deepseek-v3 preset's dims on an ep=8 decode mesh (8 data-parallel attention ranks),
    abstract weights, for cuda (cap 256 per rank) and CPU (cap 64)."""
    from serving.config import AUTO_BATCH_TOKENS, auto_max_batch, resolve_decode_buckets

    assert auto_max_batch(512, 16, "cpu") == 64 and auto_max_batch(256, 16, "cpu") == 32
    assert auto_max_batch(9, 8, "cpu") == 1 and auto_max_batch(10_000, 16, "cuda") == 256
    assert auto_max_batch(64, 16, "cuda", ranks=4) == 4 * (64 * 16 // AUTO_BATCH_TOKENS)
    explicit = EngineConfig(decode_buckets=(1, 8))
    assert resolve_decode_buckets(explicit, "cpu") is explicit
    cfg = V3.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate("v3-decode", ep=8)
    for platform, pages, want in (("cuda", 4096, 8 * 256), ("cuda", 40, 8 * 20), ("cpu", 4096, 8 * 64)):
        m = checkpoints.abstract_model(cfg, quant="fp8", fp8_linears=True, mesh=mesh, rules=DECODE_RULES,
                                       runtime=Runtime(platform=platform))
        ec = EngineConfig(page_size=64, num_pages=pages, max_model_len=512, decode_windows=(8,))
        eng = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False)
        assert eng.ranks == 8 and eng.max_batch == want, (platform, pages, eng.decode_buckets)   # per rank x 8
        assert eng.decode_buckets == tuple(b for b in (8, 16, 32, 64, 128, 256, 512, 1024) if b < want) + (want,)


def test_kv_pool_is_sized_from_a_host_budget_when_not_given():
    """num_pages=None off-GPU: enough pages for the auto batch limit's rows at max_model_len (capped by a 2 GiB host
    budget) — then the batch limit follows that pool. deepseek-v3 dims, abstract, ep=8 (8 attention ranks)."""
    from serving.config import CPU_KV_BYTES, auto_num_pages

    cfg = V3.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate("v3-decode", ep=8)
    m = checkpoints.abstract_model(cfg, quant="fp8", fp8_linears=True, mesh=mesh, rules=DECODE_RULES,
                                   runtime=Runtime(platform="cpu"))
    ec = EngineConfig(page_size=64, max_model_len=512, decode_windows=(8,))
    eng = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False)
    per_token = kv_bytes_per_token(cfg, jnp.bfloat16)
    assert eng.pages_per_rank == 64 * 512 // 64 + 1 == auto_num_pages(ec, per_token, "cpu")   # 64 rows x 512
    assert eng.max_batch == 8 * 64
    long = EngineConfig(page_size=64, max_model_len=65536)                 # the budget binds: 2 GiB of tokens
    assert auto_num_pages(long, per_token, "cpu") == CPU_KV_BYTES // per_token // 64 + 1


def test_dynamo_registration_of_v3_decode_on_8xh200(capsys):
    """What a DeepSeek-V3 decode worker (dp=8 attention ranks, wide EP, FP8) on 8xH200 registers with Dynamo, from
    the memory plan of abstract weights: one router rank holding every attention rank's pages."""
    import json

    from planner import memory

    (p,) = memory.main(["--model", "deepseek-v3", "--mesh", "dp=8", "--topology", "hgx-h200", "--dynamo"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dynamo registration "))
    reg = json.loads(line.split(" ", 2)[2])
    assert reg["attention_ranks"] == 8 and reg["data_parallel_size"] == 1
    assert reg["kv_cache_block_size"] == 64 and reg["context_length"] == 32768
    assert reg["total_kv_blocks"] == 8 * p.num_pages > 8 * 32768 // 64   # more than one full context per rank
    assert reg["max_num_seqs"] == 8 * 256                                  # the GPU cap per rank
