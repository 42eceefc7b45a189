"""bench.vs_vllm's own logic: the same prompts on both sides, worst-of-runs, aiperf's export parsed, the
latent-dim configs really at DeepSeek's latent dims. (The engines themselves run in `make bench`.)"""

import json

from bench.vllm_peer import prompt_ids
from bench.vs_vllm import CONFIGS, parse_aiperf, table, worst
from model.config import ModelConfig


def test_prompts_are_seeded_and_avoid_special_ids():
    a, b = prompt_ids(4, 32, 7, 100), prompt_ids(4, 32, 7, 100)
    assert a == b and prompt_ids(4, 32, 8, 100) != a
    assert all(len(p) == 32 and min(p) >= 2 and max(p) < 100 for p in a)


def test_worst_takes_lowest_throughput_and_highest_latency():
    runs = [{"decode_tok_s": {"1": 100.0, "16": 900.0}, "ttft_s": {"512": 0.2}, "tokens": {"1": [5]},
             "64x64/c8": {"out_tok_s": 500.0, "ttft_p50_ms": 80.0, "errors": 0}},
            {"decode_tok_s": {"1": 120.0, "16": 800.0}, "ttft_s": {"512": 0.3}, "tokens": {"1": [5]},
             "64x64/c8": {"out_tok_s": 450.0, "ttft_p50_ms": 70.0, "errors": 2}}]
    w = worst(runs)
    assert w["decode_tok_s"] == {"1": 100.0, "16": 800.0}
    assert w["ttft_s"] == {"512": 0.3}
    assert w["64x64/c8"] == {"out_tok_s": 450.0, "ttft_p50_ms": 80.0, "errors": 2}


def test_parse_aiperf_export():
    d = {"output_token_throughput": {"unit": "tokens/sec", "avg": 999.8},
         "time_to_first_token": {"unit": "ms", "p50": 109.8, "p99": 163.1},
         "inter_token_latency": {"unit": "ms", "p50": 5.9, "p99": 7.3},
         "request_count": {"avg": 32.0}, "error_summary": [{"error_details": {"code": 500}, "count": 3}]}
    r = parse_aiperf(json.loads(json.dumps(d)))
    assert r == {"out_tok_s": 999.8, "ttft_p50_ms": 109.8, "ttft_p99_ms": 163.1, "itl_p50_ms": 5.9,
                 "itl_p99_ms": 7.3, "requests": 32.0, "errors": 3}
    md = table({"shipped": {"tandem": {"online": {"64x64/c8": r}},
                            "vllm": {"online": {"64x64/c8": dict(r, out_tok_s=500.0)}}}})
    assert "| shipped | online 64x64/c8: out tok/s | 500 | 1,000 | 2.00x |" in md
    assert "errors | 3 | 3" in md


def test_latent_configs_have_deepseek_latent_dims():
    experts = []
    for name, kw in CONFIGS.items():
        c = ModelConfig(**kw)
        assert (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (512, 64, 128, 128), name
        experts.append(c.n_routed_experts)
    assert sorted(experts) == [8, 32]


def test_flag_sweep_worst_and_table_flag_changed_tokens():
    import types

    from bench import xla_cpu_flags

    ok = {"decode_tok_s": {"1": 100.0, "16": 900.0}, "ttft_s": {"512": 0.2}, "tokens": {"1": [5, 6]}}
    w = xla_cpu_flags.worst([ok, dict(ok, decode_tok_s={"1": 90.0, "16": 950.0}), {"error": "exit 134: boom"}])
    assert w["decode_tok_s"] == {"1": 90.0, "16": 900.0} and w["ttft_s"] == {"512": 0.2}
    assert xla_cpu_flags.worst([{"error": "exit 134: boom"}]) == {"error": "exit 134: boom"}
    res = {"latent-8e": {"float32": {"default": {"worst": ok},
                                     "fast-math": {"worst": dict(ok, tokens={"1": [5, 7]})},
                                     "onednn": {"worst": {"error": "exit 134: boom"}}}}}
    fv = types.SimpleNamespace(batches=["1", "16"], ttft_lens=["512"])
    old = xla_cpu_flags.FLAGS
    xla_cpu_flags.FLAGS = fv
    try:
        md = xla_cpu_flags.table(res)
    finally:
        xla_cpu_flags.FLAGS = old
    assert "| latent-8e | float32 | default | 100 | 900 | 200 | yes |" in md
    assert "| latent-8e | float32 | fast-math | 100 | 900 | 200 | **no** |" in md
    assert "onednn | error" in md


def test_step_profile_names_thunks_from_the_compiled_hlo():
    import jax
    import jax.numpy as jnp

    from bench.step_profile import hlo_ops

    f = jax.jit(lambda x, w: jax.nn.relu(x @ w).sum(0))
    hlo = f.lower(jnp.ones((4, 64)), jnp.ones((64, 32))).compile().as_text()
    d = hlo_ops(hlo)
    assert any(v.startswith(("dot f32[4,32]", "fusion f32[4,32]")) and ("dot" in v) for v in d.values()), d
