"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k, routed + shared experts.

Routing (as the HF reference / DeepSeek's release):
  scores = sigmoid(x W_g)                                   (float32)
  choice = scores + e_score_correction_bias                 (bias only *selects* experts)
  group score = sum of the top-2 `choice` in each of n_group groups; keep the best topk_group groups
  pick num_experts_per_tok experts by `choice` within the kept groups
  weights = scores of the picked experts (unbiased), / their sum if norm_topk_prob, * routed_scaling_factor

Routed experts, local implementations (`MOE_IMPLS`, chosen by `Runtime.moe_impl`; all exact, none drops a token):
  ragged — token copies sorted by expert, one grouped matmul per weight (`lax.ragged_dot`);
  dense  — every expert on every token, weighted by the router (zero for unpicked experts): E/X times the FLOPs,
           but plain batched matmuls (fast where ragged_dot is slow and E is small, e.g. XLA:CPU).
Expert parallelism (all_to_all across devices) is `model.expert_parallel.ExpertParallel`, which reuses `route`
and `expert_ffn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import MLP, Buffer, batched_matmul, grouped_matmul, param
from model.runtime import DEFAULT_RUNTIME, Runtime

MOE_IMPLS = ("ragged", "dense")


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


def expert_ffn(x_MD, group_sizes_E, gate_EDF, up_EDF, down_EFD, impl: str = "xla") -> jax.Array:
    """SwiGLU of rows x_MD sorted by expert, group_sizes_E rows per expert: one grouped matmul per weight.
    Weights are [E, K, N] arrays or `QuantizedTensor`s (`model.layers.grouped_matmul` handles both)."""
    g_MF = grouped_matmul(x_MD, gate_EDF, group_sizes_E, impl)
    u_MF = grouped_matmul(x_MD, up_EDF, group_sizes_E, impl)
    return grouped_matmul(jax.nn.silu(g_MF) * u_MF, down_EFD, group_sizes_E, impl)


def routed_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla") -> jax.Array:
    """Sum over each token's chosen experts of weight * expert(x), computed as one sorted grouped matmul."""
    N, X = idx_NX.shape
    E = gate_EDF.shape[0]
    flat_e = idx_NX.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)          # token copies sorted by expert
    token_of = order // X
    group_sizes_E = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    y_MD = expert_ffn(x_ND[token_of], group_sizes_E, gate_EDF, up_EDF, down_EFD, impl)
    y_MD = y_MD * w_NX.reshape(-1)[order][:, None].astype(y_MD.dtype)
    return jnp.zeros_like(x_ND).at[token_of].add(y_MD)


def dense_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla") -> jax.Array:
    """`routed_experts` computed densely: every expert on every token, weighted by the router (zero weight for
    experts a token did not pick), as batched matmuls over [E, N, *]."""
    N, E = x_ND.shape[0], gate_EDF.shape[0]
    w_NE = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], idx_NX].add(w_NX.astype(jnp.float32))
    x_END = jnp.broadcast_to(x_ND[None], (E, *x_ND.shape))
    g_ENF = batched_matmul(x_END, gate_EDF, impl)
    u_ENF = batched_matmul(x_END, up_EDF, impl)
    h_ENF = jax.nn.silu(g_ENF) * u_ENF * w_NE.T[:, :, None].astype(x_ND.dtype)
    return batched_matmul(h_ENF, down_EFD, impl).sum(0).astype(x_ND.dtype)


_LOCAL_IMPLS = {"ragged": routed_experts, "dense": dense_experts}


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.gate = param(rngs, (D, E), ("embed", None), jnp.float32)
        self.e_score_correction_bias = param(rngs, (E,), (None,), jnp.float32, init="zeros", kind=Buffer)
        self.experts_gate_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)
        self.experts_up_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)
        self.experts_down_proj = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), dtype)
        self.shared_experts = (MLP(D, F * cfg.n_shared_experts, rngs=rngs, dtype=dtype, axis="mlp")
                               if cfg.n_shared_experts else None)

    def router(self, x_ND) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(weights [N,X], expert ids [N,X], router logits [N,E]); logits in float32 like the reference."""
        logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), self.gate[...].astype(jnp.float32))
        w_NX, idx_NX = route(logits_NE, self.e_score_correction_bias[...], self.cfg)
        return w_NX, idx_NX, logits_NE

    def __call__(self, x_BTD: jax.Array, runtime: Runtime = DEFAULT_RUNTIME) -> jax.Array:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        w_NX, idx_NX, _ = self.router(x_ND)
        # Tokens routed to each expert in this call (load balancing in training, load metrics). Recorded only
        # under `nnx.capture(fn, nnx.Intermediate)`, so plain calls neither warn nor grow the module.
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "expert_counts",
                     jnp.bincount(idx_NX.reshape(-1), length=self.cfg.n_routed_experts))
        impl = runtime.resolved_matmul_impl()
        if runtime.expert_parallel is not None:
            experts = runtime.expert_parallel
        else:
            moe_impl = runtime.moe_impl or "ragged"
            if moe_impl not in _LOCAL_IMPLS:
                raise ValueError(f"moe_impl={moe_impl!r}: expected one of {MOE_IMPLS}")
            experts = _LOCAL_IMPLS[moe_impl]
        with jax.named_scope("routed_experts"):
            y_ND = experts(x_ND, w_NX, idx_NX, self.experts_gate_proj.get_value(), self.experts_up_proj.get_value(),
                           self.experts_down_proj.get_value(), impl)  # arrays, or QuantizedTensors
        y_BTD = y_ND.reshape(B, T, D)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                y_BTD = y_BTD + self.shared_experts(x_BTD, runtime)
        return y_BTD
