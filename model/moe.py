"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k, routed + shared experts.

Routing (as the HF reference / DeepSeek's release):
  scores = sigmoid(x W_g)                                   (float32)
  choice = scores + e_score_correction_bias                 (bias only *selects* experts)
  group score = sum of the top-2 `choice` in each of n_group groups; keep the best topk_group groups
  pick num_experts_per_tok experts by `choice` within the kept groups
  weights = scores of the picked experts (unbiased), / their sum if norm_topk_prob, * routed_scaling_factor

Experts run as one grouped matmul over all experts (`lax.ragged_dot` on token copies sorted by expert): exact,
no capacity, no dropped tokens, no Python loop. The expert-parallel dispatch (all_to_all across devices) lives
in `sharding/` and reuses `route` and `expert_ffn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import MLP, Buffer, grouped_matmul, param


def route(logits_NE: jax.Array, bias_E: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Expert weights [N,X] (float32) and indices [N,X] (int32) for router logits [N,E]."""
    E, G = cfg.n_routed_experts, cfg.n_group
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    if G > 1 and cfg.topk_group < G:
        choice_NGE = choice_NE.reshape(-1, G, E // G)
        group_scores_NG = jax.lax.top_k(choice_NGE, 2)[0].sum(-1)
        _, group_idx = jax.lax.top_k(group_scores_NG, cfg.topk_group)
        keep_NG = jnp.zeros_like(group_scores_NG, dtype=bool).at[
            jnp.arange(group_idx.shape[0])[:, None], group_idx].set(True)
        keep_NE = jnp.repeat(keep_NG, E // G, axis=1)
        choice_NE = jnp.where(keep_NE, choice_NE, -jnp.inf)
    _, idx_NX = jax.lax.top_k(choice_NE, cfg.num_experts_per_tok)
    w_NX = jnp.take_along_axis(scores_NE, idx_NX, axis=1)
    if cfg.norm_topk_prob:
        w_NX = w_NX / (w_NX.sum(-1, keepdims=True) + 1e-20)
    return w_NX * cfg.routed_scaling_factor, idx_NX.astype(jnp.int32)


def expert_ffn(x_MD, group_sizes_E, gate_EDF, up_EDF, down_EFD) -> jax.Array:
    """SwiGLU of rows x_MD sorted by expert, group_sizes_E rows per expert: one grouped matmul per weight.
    Weights are [E, K, N] arrays or FP4 `QuantizedTensor`s (`model.layers.grouped_matmul` handles both)."""
    g_MF = grouped_matmul(x_MD, gate_EDF, group_sizes_E)
    u_MF = grouped_matmul(x_MD, up_EDF, group_sizes_E)
    return grouped_matmul(jax.nn.silu(g_MF) * u_MF, down_EFD, group_sizes_E)


def routed_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD) -> jax.Array:
    """Sum over each token's chosen experts of weight * expert(x), computed as one sorted grouped matmul."""
    N, X = idx_NX.shape
    E = gate_EDF.shape[0]
    flat_e = idx_NX.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)          # token copies sorted by expert
    token_of = order // X
    group_sizes_E = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    y_MD = expert_ffn(x_ND[token_of], group_sizes_E, gate_EDF, up_EDF, down_EFD)
    y_MD = y_MD * w_NX.reshape(-1)[order][:, None].astype(y_MD.dtype)
    return jnp.zeros_like(x_ND).at[token_of].add(y_MD)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.gate = param(rngs, (D, E), ("embed", None), jnp.float32)
        self.e_score_correction_bias = param(rngs, (E,), (None,), jnp.float32, init="zeros", kind=Buffer)
        self.experts_gate_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)
        self.experts_up_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)
        self.experts_down_proj = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), dtype)
        # Expert-parallel dispatch (sharding/): a hashable callable with `routed_experts`' signature, or None
        # for the local grouped matmul. Set by `sharding` when the model is placed on a mesh with an `ep` axis.
        self.dispatch = None
        self.shared_experts = (MLP(D, F * cfg.n_shared_experts, rngs=rngs, dtype=dtype, axis="mlp")
                               if cfg.n_shared_experts else None)

    def router(self, x_ND) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(weights [N,X], expert ids [N,X], router logits [N,E]); logits in float32 like the reference."""
        logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), self.gate[...].astype(jnp.float32))
        w_NX, idx_NX = route(logits_NE, self.e_score_correction_bias[...], self.cfg)
        return w_NX, idx_NX, logits_NE

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        w_NX, idx_NX, _ = self.router(x_ND)
        # Tokens routed to each expert in this call (load balancing in training, load metrics). Recorded only
        # under `nnx.capture(fn, nnx.Intermediate)`, so plain calls neither warn nor grow the module.
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "expert_counts",
                     jnp.bincount(idx_NX.reshape(-1), length=self.cfg.n_routed_experts))
        experts = routed_experts if self.dispatch is None else self.dispatch
        y_ND = experts(x_ND, w_NX, idx_NX, self.experts_gate_proj.get_value(), self.experts_up_proj.get_value(),
                       self.experts_down_proj.get_value())  # arrays, or QuantizedTensors in a quantized model
        y_BTD = y_ND.reshape(B, T, D)
        if self.shared_experts is not None:
            y_BTD = y_BTD + self.shared_experts(x_BTD)
        return y_BTD
