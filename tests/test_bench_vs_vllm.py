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
