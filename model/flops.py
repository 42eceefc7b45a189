"""Analytic matmul FLOPs of the model's steps (2 per multiply-add), counted from the config alone.

Why analytic: XLA:CPU's `cost_analysis` counts a `lax.scan`/`while` body once, so a compiled multi-step decode
reports one step's FLOPs; and for planning at real dims no executable need exist. The serving benchmark checks
these counts against the cost analysis of a 1-step executable (`Engine.decode_cost`).

Counted: every dot/einsum of the forward (projections, attention scores and values, router, experts, head).
Not counted: norms, RoPE, softmax, sampling, gathers (they are O(elements), not O(elements x width)).
"""

from __future__ import annotations

from model.config import ModelConfig


def _q_proj(cfg: ModelConfig) -> int:
    D, H, Q = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank
    return 2 * (D * Q + Q * H * cfg.qk_head_dim) if Q else 2 * D * H * cfg.qk_head_dim


def attention_flops(cfg: ModelConfig, tokens: int, context: int, *, absorbed: bool) -> int:
    """One layer's attention for `tokens` query tokens of one sequence, each attending over `context` keys."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    K, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    per_token = _q_proj(cfg) + 2 * D * (L + R) + 2 * H * V * D          # q, kv_a, o_proj
    if absorbed:   # fold W_uk into q and W_uv into the output; attend over the latent (L + R)
        per_token += 2 * H * K * L + 2 * H * context * (L + R) + 2 * H * context * L + 2 * H * L * V
        return tokens * per_token
    # naive: decompress K and V of every key once per sequence, then per-head attention
    return tokens * (per_token + 2 * H * context * (K + R) + 2 * H * context * V) + 2 * context * L * H * (K + V)


def ffn_flops(cfg: ModelConfig, layer: int, tokens: int) -> int:
    """One layer's MLP (dense) or MoE (router + the top-k routed experts actually used + shared experts)."""
    D = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return tokens * 6 * D * cfg.intermediate_size
    F, E, X = cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    return tokens * (2 * D * E + X * 6 * D * F + cfg.n_shared_experts * 6 * D * F)


def head_flops(cfg: ModelConfig, tokens: int) -> int:
    return tokens * 2 * cfg.hidden_size * cfg.vocab_size


def mtp_flops(cfg: ModelConfig, tokens: int, context: int, *, absorbed: bool) -> int:
    """The MTP module on `tokens` positions: eh_proj, one decoder block (an MoE layer past first_k_dense), head."""
    D = cfg.hidden_size
    return (tokens * 2 * 2 * D * D + attention_flops(cfg, tokens, context, absorbed=absorbed)
            + ffn_flops(cfg, cfg.num_hidden_layers, tokens) + head_flops(cfg, tokens))


def forward_flops(cfg: ModelConfig, tokens: int, context: int, *, absorbed: bool, head_tokens: int | None = None
                  ) -> int:
    """Main model over `tokens` tokens of one sequence attending over `context` keys (all layers + head on
    `head_tokens`, default every token)."""
    total = sum(attention_flops(cfg, tokens, context, absorbed=absorbed) + ffn_flops(cfg, i, tokens)
                for i in range(cfg.num_hidden_layers))
    return total + head_flops(cfg, tokens if head_tokens is None else head_tokens)


def decode_flops(cfg: ModelConfig, batch: int, context: int, *, tokens_per_row: int = 1, mtp: bool = False) -> int:
    """One decode step of `batch` rows (absorbed MLA) attending over `context` positions each; with MTP
    speculation the main model verifies `tokens_per_row` (2) positions and the MTP module drafts on both."""
    per_row = forward_flops(cfg, tokens_per_row, context, absorbed=True)
    if mtp:
        per_row += mtp_flops(cfg, tokens_per_row, context, absorbed=True)
    return batch * per_row
