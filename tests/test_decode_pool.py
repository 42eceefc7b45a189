"""A decode step never touches the whole KV pool: the only pool-sized results are the pool passed through (parameters,
tuples, loops, calls) and the in-place scatter of the new tokens' latents. Checked on the executables themselves —
XLA:CPU's compiled HLO (f32, the CPU default; after XLA's own passes, where a float-normalization convert or a copy
of a donated buffer would show) and the cuda-lowered StableHLO at the deepseek-v3 preset's dims (bf16 cache, 8
data-parallel attention ranks, the paged Pallas kernel). On CPU both dtypes: a bf16 pool is stored as its uint16 bits
(`serving.engine.cache_layout`); the control stores it as bf16, which XLA:CPU's float normalization converts to f32
per layer, and the check must flag it (docs/BENCHMARKS.md, "Decode cost and the KV pool").
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
from model.config import ModelConfig, preset
from model.deepseek import DeepseekV3
from model.runtime import Runtime
from serving.config import EngineConfig
from serving.engine import Engine
from sharding import DECODE_RULES, Topology

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)

# DeepSeek's latent (512 + 64 rope), small everything else
LATENT = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, q_lora_rank=64, n_routed_experts=4,
                     num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                     max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=0)
IN_PLACE = {"scatter", "dynamic-update-slice"}
PASS_THROUGH = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional"}


def pool_sized_hlo_ops(hlo: str, min_elems: int) -> collections.Counter:
    """Instructions of compiled HLO text, outside fused computations, whose result has >= min_elems elements and
    that neither pass a buffer through nor update it in place (a fusion counts as in place when its root is)."""
    comps, cur, roots, fused = {}, None, {}, set()
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(2), [])
            continue
        if cur is None:
            continue
        ins = re.match(r"^\s*(ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if ins:
            cur.append((ins.group(3), int(np.prod([int(d) for d in ins.group(2).split(",") if d]))))
            if ins.group(1):
                roots[next(k for k, v in comps.items() if v is cur)] = ins.group(3)
        fused.update(re.findall(r"calls=%([\w.\-]+)", line) if " fusion(" in line else [])
    bad = collections.Counter()
    for name, insts in comps.items():
        if name in fused:
            continue
        for op, n in insts:
            if n >= min_elems and op not in PASS_THROUGH | IN_PLACE and op != "fusion":
                bad[op] += 1
    # fusions: in place when their computation's root is
    for line in hlo.splitlines():
        m = re.match(r"^\s*(ROOT )?%\S+ = \w+\[([\d,]*)\]\S* fusion\(.*calls=%([\w.\-]+)", line)
        if m and int(np.prod([int(d) for d in m.group(2).split(",") if d])) >= min_elems \
                and roots.get(m.group(3)) not in IN_PLACE:
            bad["fusion:" + str(roots.get(m.group(3)))] += 1
    return bad


def _cpu_decode(dtype) -> tuple[str, int]:
    model = DeepseekV3(LATENT, rngs=nnx.Rngs(0), dtype=dtype)
    model.runtime = Runtime(platform="cpu")
    ec = EngineConfig(page_size=16, num_pages=1024, max_model_len=256, prefill_buckets=(16,), prefill_rows=(1,),
                      decode_buckets=(8,), decode_steps=2, decode_windows=(16,))
    eng = Engine(model, ec, roles={"decode"}, compile=False)
    L, N, Z, C = eng.cache_shape
    return eng.lower_decode(8, 16, 2).compile().as_text(), N * Z * C   # one layer's pool


@pytest.mark.parametrize("dtype,pool", [(jnp.float32, "f32"), (jnp.bfloat16, "u16")])
def test_cpu_decode_has_no_pool_sized_op(dtype, pool):
    hlo, layer_pool = _cpu_decode(dtype)
    assert pool_sized_hlo_ops(hlo, layer_pool) == {}, pool_sized_hlo_ops(hlo, layer_pool)
    assert re.search(rf"= {pool}\[2,1024,16,576\]\S* (scatter|fusion)\(", hlo)   # the write is there, in place


def test_the_check_sees_a_bf16_pool_converted_on_cpu(monkeypatch):
    """Control: a pool stored as bf16 on CPU (what the engine did before it stored the bits as uint16) is upcast to
    f32 by XLA:CPU's float normalization around its gathers and scatter — and the check names the converts."""
    import serving.engine

    layout = serving.engine.cache_layout
    monkeypatch.setattr(serving.engine, "cache_layout", lambda cfg, model, platform="cuda": layout(cfg, model))
    hlo, layer_pool = _cpu_decode(jnp.bfloat16)
    bad = pool_sized_hlo_ops(hlo, layer_pool)
    assert bad and any("convert" in k for k in bad), bad


@pytest.mark.timeout(600)
def test_cuda_decode_at_v3_dims_has_no_pool_sized_op():
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    cfg = preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate("v3-decode", ep=8)
    m = checkpoints.abstract_model(cfg, quant="fp8", fp8_linears=True, mesh=mesh, rules=DECODE_RULES,
                                   runtime=Runtime(platform="cuda"))
    ec = EngineConfig(page_size=64, num_pages=512, max_model_len=512, decode_buckets=(64,), decode_windows=(8,))
    eng = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False)
    L, N, Z, C = eng.cache_shape
    assert eng.cache.dtype == jnp.bfloat16 and eng.ranks == 8 and (Z, C) == (64, 576)
    pools = {f"tensor<{L}x{N}x{Z}x{C}xbf16>", f"tensor<{L}x{N // 8}x{Z}x{C}xbf16>"}   # global, one rank's
    with mlir.make_ir_context():
        module = ir.Module.parse(eng.exported("cuda")[("decode", 64, 8)].mlir_module())
    seen = collections.Counter()

    def walk(op):
        seen.update(op.name for r in op.results if str(r.type) in pools)
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    walk(o.operation)

    walk(module.operation)
    assert seen["stablehlo.scatter"] == L   # each layer's write, on its rank's pages
    assert set(seen) <= {"stablehlo.scatter", "stablehlo.while", "func.call", "sdy.manual_computation"}, seen
    assert jax.devices()[0].platform == "cpu"   # exported from this CPU host


def test_cpu_decode_copies_no_absorbed_weight():
    """The absorbed einsums read W_uk [H, L, K] / W_uv [H, L, V] in place: no copy or transpose of a weight-sized
    [H, K, L] / [H, L, V] block per step (as one [L, H, K+V] kv_b_proj, XLA copied both every layer every step)."""
    hlo, _ = _cpu_decode(jnp.float32)
    H, L, K, V = LATENT.num_attention_heads, LATENT.kv_lora_rank, LATENT.qk_nope_head_dim, LATENT.v_head_dim
    shapes = "|".join(re.escape(f"f32[{s}]") for s in (f"{H},{K},{L}", f"{H},{L},{V}", f"{L},{H},{K}"))
    moved = re.findall(rf"%(\S*(?:copy|transpose)\S*) = (?:{shapes})", hlo)
    assert moved == [], moved


def test_cuda_decode_with_mtp_at_v3_dims_carries_rows_on_the_device():
    """Overlapped decode with MTP at DeepSeek-V3's dims: the cuda-exported decode takes and returns each slot's (last
    token, position, draft) and the draft's distribution over the 129,280-token vocabulary, so the next dispatch is
    queued without the host reading how many drafts were accepted."""
    cfg = preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=1)
    mesh = Topology.preset("cpu:8/1").allocate("v3-mtp-decode", ep=8)
    m = checkpoints.abstract_model(cfg, quant="fp8", fp8_linears=True, mesh=mesh, rules=DECODE_RULES,
                                   runtime=Runtime(platform="cuda"))
    ec = EngineConfig(page_size=64, num_pages=512, max_model_len=512, decode_buckets=(64,), decode_windows=(8,),
                      mtp=True)
    ex = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False).exported("cuda")[("decode", 64, 8)]
    carry = [((64, 3), jnp.int32), ((64, cfg.vocab_size), jnp.float32)]
    ins = [(tuple(a.shape), a.dtype) for a in ex.in_avals]
    outs = [(tuple(a.shape), a.dtype) for a in ex.out_avals]
    assert cfg.vocab_size == 129280 and all(ins.count(c) >= 1 for c in carry)
    assert outs[-4:-2] == carry   # ... last_M3, last_MW, cache, routing counts


def test_cpu_blockwise_decode_at_v3_dims_absorbs_values_with_heads_leading():
    """XLA:CPU's decode at DeepSeek-V3's dims (abstract f32 weights, 128 heads, the 576-wide latent, blockwise
    attention): each layer absorbs W_uv as one head-batched [128, B, 512] x [128, 512, 128] dot — the heads-leading
    form XLA:CPU runs as plain matmuls, not the strided batched dot of "bthl,hlv" (docs/serving.md)."""
    cfg = preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset("cpu:8/1").allocate("v3-cpu-decode", ep=1)
    m = checkpoints.abstract_model(cfg, dtype=jnp.float32, mesh=mesh, rules=DECODE_RULES,
                                   runtime=Runtime(platform="cpu"))
    ec = EngineConfig(page_size=16, num_pages=256, max_model_len=512, decode_buckets=(16,), decode_windows=(32,),
                      decode_steps=1)
    eng = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False)
    assert eng.ranks == 1 and eng.cache_shape[2:] == (16, 576)
    text = eng.lower_decode(16, 32, 1).as_text()
    absorb = re.findall(r"stablehlo\.dot_general .*batching_dims = \[0\] x \[0\], contracting_dims = \[2\] x \[1\].*"
                        r"\(tensor<128x16x512xf32>, tensor<128x512x128xf32>\) -> tensor<128x16x128xf32>", text)
    assert len(absorb) == cfg.num_hidden_layers, absorb
