"""FP8 latent KV cache: e4m3 codes + a per-token f32 scale in one uint8 row per token.

Specification: rows round-trip within e4m3's precision; the engine serves with it colocated and disaggregated
(the uint8 pages move like any others) and frees every page; bytes per token are about half of bf16; the
teacher-forced likelihood through the FP8 cache stays within 1% of the float cache.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import hf_reference
from bench.kv_cache_eval import perplexity
from serving import LLM, EngineConfig, SamplingParams
from model.paged_cache import decode_fp8_rows, encode_fp8_rows
from sharding.plan import kv_bytes_per_token

EC = EngineConfig(page_size=8, num_pages=24, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(4,),
                  decode_steps=2, cache_dtype="fp8", decode_windows=(8,))
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7, 1, 88, 15, 4, 27, 51, 19, 6, 40], [3, 1, 4], [9, 2, 6, 5, 35]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kv8_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    return checkpoints.load(path, dtype=jnp.float32)


def test_rows_round_trip_within_e4m3_precision():
    x = np.random.default_rng(0).standard_normal((5, 7, 24)).astype(np.float32) * [[[3.0]], [[0.01]], [[100]],
                                                                                   [[1]], [[1e-4]]]
    raw = encode_fp8_rows(jnp.asarray(x))
    assert raw.dtype == jnp.uint8 and raw.shape == (5, 7, 28)
    back = np.asarray(decode_fp8_rows(raw, jnp.float32))
    amax = np.abs(x).max(-1, keepdims=True)
    assert (np.abs(back - x) <= 2 ** -4 * np.maximum(np.abs(x), amax / 448 * 2 ** 3) + 1e-12).all()
    np.testing.assert_array_equal(np.asarray(decode_fp8_rows(encode_fp8_rows(jnp.zeros((2, 24))), jnp.float32)), 0)


def test_fp8_cache_halves_bytes_and_keeps_the_likelihood(model):
    cfg = model.cfg
    assert kv_bytes_per_token(cfg, "fp8") / kv_bytes_per_token(cfg, jnp.bfloat16) == (24 + 4) / 48
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 8 * 32 + 1)
    p32, _ = perplexity(model, ids, 32, 8, 8, fp8=False)
    p8, _ = perplexity(model, ids, 32, 8, 8, fp8=True)
    assert abs(p8 / p32 - 1) < 0.01, (p32, p8)


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_engine_serves_with_the_fp8_cache(model, mode):
    kw = dict(mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=2") if mode == "disagg" else {}
    with LLM(model=model, engine_config=EC, **kw) as llm:
        assert llm.decode_engine.cache.dtype == jnp.uint8 and llm.decode_engine.cache.shape[-1] == 28
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8))
        assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in outs)
        if mode == "colocated":   # the first token (prefill through the quantized pages) is the float cache's
            with LLM(model=model, engine_config=EngineConfig(**{**EC.__dict__, "cache_dtype": None})) as ref:
                want = ref.generate(PROMPTS, SamplingParams(max_tokens=1))
            assert [o.token_ids[0] for o in outs] == [w.token_ids[0] for w in want]
        for name, pool in llm.page_pools().items():
            pool.allocator.check()
            assert pool.allocator.free == pool.allocator.total
