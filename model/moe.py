"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k, routed + shared experts.

Routing (as the HF reference / DeepSeek's release):
  scores = sigmoid(x W_g)                                   (float32)
  choice = scores + e_score_correction_bias                 (bias only *selects* experts)
  group score = sum of the top-2 `choice` in each of n_group groups; keep the best topk_group groups
  pick num_experts_per_tok experts by `choice` within the kept groups
  weights = scores of the picked experts (unbiased), / their sum if norm_topk_prob, * routed_scaling_factor

Routed experts, local implementations (`MOE_IMPLS`, chosen by `Runtime.moe_impl` or per shape by
`choose_moe_impl`; all exact, none drops a token):
  ragged   — token copies sorted by expert, one grouped matmul per weight (`lax.ragged_dot`; the GPU kernels);
  dense    — every expert on every token, weighted by the router (zero for unpicked experts): E/X times the
             FLOPs, but plain batched matmuls (fast where ragged_dot is slow and E is small, e.g. XLA:CPU);
  gather   — each token copy's expert weights gathered and applied as a batched matvec (few copies, many experts);
  capacity — copies bucketed per expert up to a capacity, one batched matmul, with an exact fallback on overflow;
  segment  — a loop over only the live (expert, row tile) items of the copies sorted by expert.
Expert parallelism (all_to_all across devices) is `model.expert_parallel.ExpertParallel`, which reuses `route`
and `expert_ffn`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.layers import MLP, Buffer, batched_matmul, dense, grouped_matmul, param
from pallas_kernels.formats import QuantizedTensor
from pallas_kernels.fp8 import Fp8Tensor
from model.runtime import DEFAULT_RUNTIME, Runtime

MOE_IMPLS = ("ragged", "dense", "gather", "capacity", "segment")


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
    return _combine(y_MD, order, w_NX)


def _combine(y_MD, order, w_NX):
    """Sum of each token's weighted copies (rows y_MD in the sorted `order`), added in the token's own copy order:
    the result does not depend on which (physical) expert ids the copies had."""
    N, X = w_NX.shape
    y_NXD = jnp.zeros_like(y_MD).at[order].set(y_MD).reshape(N, X, -1)
    return (y_NXD * w_NX[:, :, None].astype(y_MD.dtype)).sum(1)


def dense_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla") -> jax.Array:
    """`routed_experts` computed densely: every expert on every token, weighted by the router (zero weight for
    experts a token did not pick), as batched matmuls over [E, N, *]."""
    N, E = x_ND.shape[0], gate_EDF.shape[0]
    x_END = jnp.broadcast_to(x_ND[None], (E, *x_ND.shape))
    g_ENF = batched_matmul(x_END, gate_EDF, impl)
    u_ENF = batched_matmul(x_END, up_EDF, impl)
    y_END = batched_matmul(jax.nn.silu(g_ENF) * u_ENF, down_EFD, impl)
    # each token's copies weighted and added in its copy order (not the experts' order: the same sum for any
    # expert ids, e.g. EPLB's replicas)
    y_NXD = y_END[idx_NX, jnp.arange(N)[:, None]]
    return (y_NXD * w_NX[:, :, None].astype(y_NXD.dtype)).sum(1).astype(x_ND.dtype)


def _take_experts(w, idx):
    """Expert weights [E, K, N] (plain or quantized) gathered by index -> a plain [..., K, N] array."""
    if isinstance(w, (QuantizedTensor, Fp8Tensor)):
        return dense(_take_quantized(w, idx), jnp.float32)
    return w[idx]


def _take_quantized(w, idx):
    lead = idx.shape
    if isinstance(w, Fp8Tensor):
        return Fp8Tensor(w.codes[idx], w.scales[idx], (*lead, *w.shape[1:]), w.lead - 1 + len(lead), w.k_ndim,
                         w.block)
    return QuantizedTensor(w.codes[idx], w.scales[idx], w.tensor_scale[idx], w.fmt, (*lead, *w.shape[1:]))


def gather_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla") -> jax.Array:
    """`routed_experts` by gathering each token copy's expert weights: exactly the top-k work (N x X x 3 matmuls
    of [D] x [D, F]) but it reads one weight matrix per copy — fast while copies are few (decode, small batches)."""
    dt = x_ND.dtype
    N, X = idx_NX.shape
    g_NXDF = _take_experts(gate_EDF, idx_NX).astype(dt)
    u_NXDF = _take_experts(up_EDF, idx_NX).astype(dt)
    d_NXFD = _take_experts(down_EFD, idx_NX).astype(dt)
    # the token row once per copy, so every product is a batched [1, D] x [D, F] with (n, x) leading: contracting
    # "nd,nxdf" instead made XLA:CPU copy each gathered gate/up weight into a [D, X*F] layout every step (latent-32e
    # batch 1: six 4 MB copies, 3.4 of 15 ms per step in `bench.step_profile`; latent-8e's layer 0.64 -> 0.13 ms in
    # a microbenchmark)
    x_NXD = jnp.broadcast_to(x_ND[:, None], (N, X, x_ND.shape[-1]))
    h_NXF = jax.nn.silu(jnp.einsum("nxd,nxdf->nxf", x_NXD, g_NXDF)) * jnp.einsum("nxd,nxdf->nxf", x_NXD, u_NXDF)
    y_NXD = jnp.einsum("nxf,nxfd->nxd", h_NXF, d_NXFD)
    return jnp.einsum("nxd,nx->nd", y_NXD, w_NX.astype(dt))


def _expert_weight(w, e):
    """Expert e's [K, N] weight as a plain array (dequantized when packed); e may be traced."""
    if isinstance(w, (QuantizedTensor, Fp8Tensor)):
        return dense(_index_quantized(w, e), jnp.float32)
    return jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _index_quantized(w, e):
    one = lambda a: jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False)
    if isinstance(w, Fp8Tensor):
        return Fp8Tensor(one(w.codes), one(w.scales), w.shape[1:], w.lead - 1, w.k_ndim, w.block)
    return QuantizedTensor(one(w.codes), one(w.scales), one(w.tensor_scale), w.fmt, w.shape[1:])


def segment_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla", tile: int | None = None,
                    valid_NX: jax.Array | None = None) -> jax.Array:
    """`routed_experts` as a loop over (expert, row tile) work items of the token copies sorted by expert: each
    item multiplies up to `tile` rows of one expert by that expert's weights — the top-k work plus at most one
    partial tile per expert, exact for any routing (no capacity to overflow), plain matmuls (no ragged_dot).
    `valid_NX`: copies to compute (the others add nothing and cost nothing; e.g. empty capacity slots)."""
    N, X = idx_NX.shape
    E = gate_EDF.shape[0]
    M = N * X
    t = tile or _segment_tile(M, E)
    flat_e = idx_NX.reshape(-1) if valid_NX is None else jnp.where(valid_NX.reshape(-1), idx_NX.reshape(-1), E)
    order = jnp.argsort(flat_e, stable=True)
    token_of = order // X
    sizes_E = jnp.bincount(flat_e, length=E + 1)[:E].astype(jnp.int32)
    ends = jnp.cumsum(sizes_E)
    starts = ends - sizes_E
    ntiles = (sizes_E + t - 1) // t
    tile_end = jnp.cumsum(ntiles)
    x_MD = jnp.pad(x_ND[token_of], ((0, t), (0, 0)))           # a t-row read from any row < M stays in bounds
    D = x_ND.shape[1]

    def body(i, y_MD):
        e = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), E - 1).astype(jnp.int32)
        r0 = starts[e] + (i - (tile_end[e] - ntiles[e])) * t
        xs = jax.lax.dynamic_slice_in_dim(x_MD, r0, t, 0)
        h = jax.nn.silu(xs @ _expert_weight(gate_EDF, e).astype(xs.dtype)) * (
            xs @ _expert_weight(up_EDF, e).astype(xs.dtype))
        ys = h @ _expert_weight(down_EFD, e).astype(xs.dtype)
        rows_ok = (r0 + jnp.arange(t)) < ends[e]
        old = jax.lax.dynamic_slice_in_dim(y_MD, r0, t, 0)
        return jax.lax.dynamic_update_slice_in_dim(y_MD, jnp.where(rows_ok[:, None], ys, old), r0, 0)

    # only the live items (sum_e ceil(size_e / t), a traced count): idle experts cost nothing (a while loop;
    # the static bound ceil(M / t) + E would run every idle expert's matmuls too)
    y_MD = jax.lax.fori_loop(0, tile_end[-1], body, jnp.zeros((M + t, D), x_ND.dtype))[:M]
    return _combine(y_MD, order, w_NX)


def _segment_tile(copies: int, experts: int) -> int:
    """Rows per work item: about the mean load per expert, a power of two in [4, 32]."""
    return max(4, min(32, 1 << max(0, (-(-copies // experts) - 1).bit_length())))


def capacity(n_copies: int, n_experts: int, factor: float = 2.0) -> int:
    return max(1, math.ceil(factor * n_copies / n_experts))


def capacity_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla",
                     factor: float = 2.0) -> jax.Array:
    """`routed_experts` as a capacity-padded batched matmul: token copies scattered into [E, C, D] buckets
    (C = factor x the mean load), one batched matmul per weight, gathered back. Exact: when any expert gets more
    than C copies the whole call takes the segment path instead (`lax.cond`; no capacity to overflow there)."""
    N, X = idx_NX.shape
    E = gate_EDF.shape[0]
    C = capacity(N * X, E, factor)
    flat_e = idx_NX.reshape(-1)
    onehot_ME = flat_e[:, None] == jnp.arange(E)[None, :]
    slot_M = (jnp.cumsum(onehot_ME, 0) * onehot_ME).sum(-1) - 1              # position within its expert
    overflow = jnp.max(onehot_ME.sum(0)) > C

    def padded(x_ND):
        x_MD = jnp.repeat(x_ND, X, axis=0)
        dest = flat_e * C + slot_M
        x_ECD = jnp.zeros((E * C, x_ND.shape[1]), x_ND.dtype).at[dest].set(x_MD).reshape(E, C, -1)
        h = jax.nn.silu(batched_matmul(x_ECD, gate_EDF, impl)) * batched_matmul(x_ECD, up_EDF, impl)
        y_MD = batched_matmul(h, down_EFD, impl).reshape(E * C, -1)[dest]
        return (y_MD * w_NX.reshape(-1)[:, None].astype(y_MD.dtype)).reshape(N, X, -1).sum(1)

    return jax.lax.cond(overflow, lambda x: segment_experts(x, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl),
                        padded, x_ND)


# ---- choosing the implementation per shape ---------------------------------------------------------------------
# A cost model of XLA:CPU, fitted to `bench/decode_grid.py --moe_only` on the 2-core development machine
# (docs/BENCHMARKS.md, "Decode speed grid"): streaming expert weights ~35 GB/s, dense matmul work ~80 GMAC/s,
# gathering per-copy weight matrices ~5 GB/s, and ragged_dot executed as a dot over every expert group.
# The segment loop also copies each item's expert weights (a dynamic slice is a copy before XLA:CPU's dot): on a
# 2-core Zen 4 the copies ran ~20 GB/s (`bench.step_profile`, latent-8e batch 16: 2.3 of 24 ms per step) and made
# segment 2x slower than capacity there, while the model without them ranked segment first. Charged at 40 GB/s:
# at 20 the model picked dense for latent-32e at batch 8-16, measured 1.5x slower than segment. An expert whose
# three weights fit a core's L2 (`slice_copy_free_bytes`) is copied at cache speed and not charged: the shipped
# model's 0.3 MB experts at 128 rows ran segment 0.95 vs capacity 1.24 ms a layer (Zen 4), as the model without
# the charge predicts.
CPU_COSTS = dict(weight_gbps=35.0, gmacs=80.0, gather_gbps=5.0, loop_us=5.0, slice_copy_gbps=40.0,
                 slice_copy_free_bytes=1 << 20)
GATHER_CACHE_BYTES = 32 << 20   # gathered expert weights up to this size: gather's fast regime on this CPU


def _overflow_probability(copies: int, experts: int, cap: int) -> float:
    """P(some expert receives more than `cap` of `copies` uniformly routed copies) (Poisson approximation)."""
    mu = copies / experts
    p_le, term = 0.0, math.exp(-mu)
    for k in range(cap + 1):
        p_le += term
        term *= mu / (k + 1)
    return 1.0 - min(1.0, p_le) ** experts


def _expected_items(copies: int, experts: int, t: int) -> float:
    """E[sum_e ceil(n_e / t)]: the segment path's live work items for uniformly routed copies (n_e ~ Poisson)."""
    mu = copies / experts
    total, term, k = 0.0, math.exp(-mu), 0
    while k <= max(4 * mu, 8) + 16:
        total += term * -(-k // t)
        k += 1
        term *= mu / k
    return experts * total


def moe_costs(cfg: ModelConfig, n_tokens: int, itemsize: int = 4, costs: dict = CPU_COSTS) -> dict[str, float]:
    """Modelled seconds of one MoE layer's routed experts for `n_tokens` rows, per local implementation."""
    E, X, D, F = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    M, w = n_tokens * X, 3 * D * F                      # token copies; weight elements per expert
    stream = E * w * itemsize / (costs["weight_gbps"] * 1e9)
    dense = stream + E * n_tokens * w / (costs["gmacs"] * 1e9)
    C = capacity(M, E)
    t = _segment_tile(M, E)
    items = _expected_items(M, E, t)
    copy = 0.0 if w * itemsize <= costs["slice_copy_free_bytes"] else w * itemsize / (costs["slice_copy_gbps"] * 1e9)
    segment = items * (t * w / (costs["gmacs"] * 1e9) + w * itemsize / (costs["weight_gbps"] * 1e9) + copy
                       + costs["loop_us"] * 1e-6)
    out = {"dense": dense, "gather": M * w * itemsize / (costs["gather_gbps"] * 1e9), "segment": segment,
           "capacity": stream + E * C * w / (costs["gmacs"] * 1e9) + _overflow_probability(M, E, C) * segment,
           "ragged": stream + E * M * w / (costs["gmacs"] * 1e9)}
    return out


def choose_moe_impl(cfg: ModelConfig, n_tokens: int, platform: str, itemsize: int = 4) -> str:
    """The routed-expert implementation for a call of `n_tokens` rows: on GPUs the sorted grouped matmul
    (`ragged`: a grouped kernel per expert segment); elsewhere the cheapest by `moe_costs` (XLA:CPU runs ragged_dot
    as a dot over every group, so it is never the cheapest there)."""
    if platform in ("gpu", "cuda", "rocm", "tpu"):
        return "ragged"
    # Fewer token copies than experts, and their gathered weights small enough to stay in cache: most experts
    # are idle and gathering the few used ones wins. Measured (`bench/decode_grid.py --moe_only`, 2 cores): of
    # the 14 such grid cells gather was the fastest path in 9 and within 1.5x in 3 more; the cost model below,
    # which charges per byte only, picked paths up to 5x slower there.
    M, w = n_tokens * cfg.num_experts_per_tok, 3 * cfg.hidden_size * cfg.moe_intermediate_size
    if M < cfg.n_routed_experts and M * w * itemsize <= GATHER_CACHE_BYTES:
        return "gather"
    c = moe_costs(cfg, n_tokens, itemsize)
    return min(("dense", "gather", "capacity", "segment"), key=lambda k: (c[k], k))


# ---- redundant experts (EPLB) -------------------------------------------------------------------------------
# With n_redundant_experts > 0 a MoE layer holds P = E + R physical expert weights; `expert_logical_P` says which
# logical expert each one is (a table, so a new placement needs new data, not a new executable). Routing picks
# logical experts as always; each token copy then goes to one of its expert's replicas (`physical_ids`), and the
# replicas' weights are equal, so outputs do not change. `sharding.eplb` computes placements from routing counts.

def uniform_placement(n_experts: int, n_physical: int) -> np.ndarray:
    """The placement before any statistics: physical p < E is expert p, the extra copies round-robin."""
    return (np.arange(n_physical) % n_experts).astype(np.int32)


def replica_table(logical_P, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(replicas [E, 1 + P - E] physical ids of each logical expert, the unused tail repeating its first; counts
    [E]) of a placement. Raises if an expert has no replica or an id is out of range."""
    logical_P = np.asarray(logical_P, np.int64)
    P = logical_P.shape[0]
    if logical_P.min(initial=0) < 0 or logical_P.max(initial=0) >= n_experts:
        raise ValueError(f"placement names experts outside [0, {n_experts})")
    counts = np.bincount(logical_P, minlength=n_experts)
    if (counts == 0).any():
        raise ValueError(f"placement leaves experts {np.flatnonzero(counts == 0)[:8].tolist()} without a replica")
    table = np.zeros((n_experts, 1 + P - n_experts), np.int32)
    for e in range(n_experts):
        ids = np.flatnonzero(logical_P == e)
        table[e] = np.resize(ids, table.shape[1])
    return table, counts.astype(np.int32)


def physical_ids(idx_NX: jax.Array, replicas_EK: jax.Array, n_replicas_E: jax.Array) -> jax.Array:
    """Each token copy's physical expert: replica (row mod count) of its logical expert — the rows choosing an
    expert spread evenly over its replicas."""
    n_N1 = jnp.arange(idx_NX.shape[0], dtype=jnp.int32)[:, None]
    r_NX = n_N1 % n_replicas_E[idx_NX]
    return replicas_EK[idx_NX, r_NX]


_LOCAL_IMPLS = {"ragged": routed_experts, "dense": dense_experts, "gather": gather_experts,
                "capacity": capacity_experts, "segment": segment_experts}


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        D, E, F, P = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.n_physical_experts
        self.cfg = cfg
        self.gate = param(rngs, (D, E), ("embed", None), jnp.float32)
        self.e_score_correction_bias = param(rngs, (E,), (None,), jnp.float32, init="zeros", kind=Buffer)
        self.experts_gate_proj = param(rngs, (P, D, F), ("experts", "embed", "expert_mlp"), dtype)
        self.experts_up_proj = param(rngs, (P, D, F), ("experts", "embed", "expert_mlp"), dtype)
        self.experts_down_proj = param(rngs, (P, F, D), ("experts", "expert_mlp", "embed"), dtype)
        if cfg.n_redundant_experts:   # the placement, as data (replicated: every device routes every token)
            logical_P = uniform_placement(E, P)
            replicas_EK, n_replicas_E = replica_table(logical_P, E)
            self.expert_logical = Buffer(jnp.asarray(logical_P), axes=(None,))
            self.expert_replicas = Buffer(jnp.asarray(replicas_EK), axes=(None, None))
            self.expert_n_replicas = Buffer(jnp.asarray(n_replicas_E), axes=(None,))
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
            self.sow(nnx.Intermediate, "expert_choices", idx_NX)   # per row (the engine drops padding rows)
        if self.cfg.n_redundant_experts:
            idx_NX = physical_ids(idx_NX, self.expert_replicas[...], self.expert_n_replicas[...])
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
