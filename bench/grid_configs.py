"""The decode grid's configs (bench.decode_grid, bench.host_overlap): DeepSeek-shaped models by (hidden,
routed experts, top-k, layers), as HF config dicts."""

from __future__ import annotations

# name: (hidden, routed experts, top-k, layers)
CONFIGS = {"A": (128, 8, 2, 2), "B": (128, 64, 8, 4), "C": (256, 32, 4, 4), "D": (512, 8, 2, 8),
           "E": (512, 64, 8, 2), "F": (384, 16, 6, 6)}


def hf_config(D, E, X, L) -> dict:
    h = max(4, D // 64)
    return dict(vocab_size=4096, hidden_size=D, intermediate_size=2 * D, moe_intermediate_size=D // 2,
                num_hidden_layers=L, num_attention_heads=h, n_shared_experts=1, n_routed_experts=E,
                num_experts_per_tok=X, n_group=1, topk_group=1, kv_lora_rank=D // 4, q_lora_rank=3 * D // 8,
                qk_rope_head_dim=16, v_head_dim=D // h // 2, qk_nope_head_dim=D // h // 2, first_k_dense_replace=1,
                max_position_embeddings=512, rope_interleave=True,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                                 "beta_slow": 1})
