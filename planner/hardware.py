"""Accelerators (datasheet figures), efficiencies, and what one token of a model costs (weights, KV, FLOPs)."""

from __future__ import annotations

import dataclasses
from typing import Any

# ---- hardware ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator in its system. Bandwidths are per GPU, one direction (decimal GB/s); FLOP/s dense (no
    sparsity). fp4 = None: no FP4 tensor cores (FP4 weights are dequantized and multiplied at the FP8 rate)."""

    name: str
    hbm_bytes: float
    hbm_gbs: float
    bf16_flops: float
    fp8_flops: float
    fp4_flops: float | None
    domain: int                   # GPUs in one NVLink domain
    nvlink_gbs: float             # per GPU, one direction, inside the domain
    scaleout_gbs: float           # per GPU, one direction, across domains (InfiniBand / RoCE NIC per GPU)
    usd_per_gpu_hour: float
    system: str = ""

    def peak(self, kind: str) -> float:
        if kind == "fp4":
            return self.fp4_flops or self.fp8_flops
        return self.fp8_flops if kind == "fp8" else self.bf16_flops


# Vendor datasheet figures (dense). NVLink 4 = 900 GB/s per GPU both directions (450 each way); NVLink 5 1.8 TB/s
# (900 each way). Scale-out: one 400 Gb/s NIC per GPU (50 GB/s). Prices are illustrative on-demand rates, a
# parameter (--price name=usd), not a measurement.
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 80e9, 3350, 989e12, 1979e12, None, 8, 450, 50, 2.50, "HGX H100 (8 per NVLink4 domain)"),
    "h200": Hardware("h200", 141e9, 4800, 989e12, 1979e12, None, 8, 450, 50, 3.20, "HGX H200 (8 per NVLink4 domain)"),
    "b200": Hardware("b200", 180e9, 8000, 2250e12, 4500e12, 9000e12, 8, 900, 50, 5.00,
                     "HGX B200 (8 per NVLink5 domain)"),
    "gb200": Hardware("gb200", 186e9, 8000, 2500e12, 5000e12, 10000e12, 72, 900, 50, 6.00,
                      "GB200 NVL72 (72 per NVLink5 domain)"),
}


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peaks a real step reaches, and fixed costs. Defaults: docs/planner.md."""

    compute_prefill: float = 0.55      # of dense peak, large-M GEMMs and flash attention in prefill
    compute_decode: float = 0.40       # of dense peak, small-M grouped GEMMs / MLA decode
    hbm: float = 0.80                  # of HBM bandwidth, weight and KV streaming
    nvlink: float = 0.75               # of NVLink bandwidth, all-to-all / all-reduce in a domain
    scaleout: float = 0.80             # of NIC bandwidth, across domains
    overlap_decode: float = 0.5        # share of collective time hidden behind compute (two-batch overlap)
    overlap_prefill: float = 0.8
    collective_latency_in: float = 8e-6    # s per collective inside a domain
    collective_latency_out: float = 25e-6  # s per collective across domains
    kernels_per_layer: int = 16        # kernel launches per decoder layer
    # s per kernel: launch gap, tail and sync. 1.5 us a priori (CUDA graphs); 4.7 us is the one value fitted to a
    # published figure (HGX B200, docs/planner.md); the GB200 NVL72 figure is then predicted at +40%
    kernel_overhead: float = 4.7e-6
    step_overhead: float = 300e-6      # s per step: scheduling, sampling, host work
    ep_imbalance: float = 1.15         # busiest EP rank's routed work / mean
    prefill_util: float = 0.8          # target utilization of the prefill pool (queueing)
    kv_memory_fraction: float = 0.9    # of HBM the engine may use
    # compute and memory time of a layer add up instead of overlapping (XLA:CPU runs one op at a time: a
    # matmul-bound op and a bandwidth-bound op never share time); False on GPUs
    serial: bool = False

    def replace(self, **kw) -> "Efficiency":
        return dataclasses.replace(self, **kw)


# ---- what one token costs: weights, KV, FLOPs (from the model's declared weights and the engine's FLOP count) --


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Per-layer weight bytes by part, KV bytes per token, matmul FLOPs per token by part."""

    name: str
    layers: int
    dense_layers: int
    mtp_layers: int
    experts: int
    top_k: int
    hidden: int
    dense_layer_bytes: float        # attention + dense MLP + norms of a dense layer
    moe_attn_bytes: float           # attention + shared experts + router + norms of an MoE layer
    expert_bytes: float             # ONE routed expert (gate, up, down + scales)
    embed_bytes: float
    head_bytes: float
    mtp_extra_bytes: float          # MTP's eh_proj and norms (its block counts as an MoE layer)
    kv_bytes_per_token_layer: float
    expert_format: str              # "fp4" | "fp8" | "bf16": tensor-core rate of the routed experts
    linear_format: str              # of the other linears
    cfg: Any = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def total_weight_bytes(self) -> float:
        moe = self.layers - self.dense_layers + self.mtp_layers
        return (self.dense_layers * self.dense_layer_bytes + moe * (self.moe_attn_bytes + self.experts
                * self.expert_bytes) + self.embed_bytes + self.head_bytes + self.mtp_layers * self.mtp_extra_bytes)

    def kv_bytes_per_token(self) -> float:
        return (self.layers + self.mtp_layers) * self.kv_bytes_per_token_layer

    # FLOPs per token (2 per multiply-add), from model.flops
    def attn_flops(self, context: int, *, absorbed: bool) -> float:
        from model.flops import attention_flops

        return attention_flops(self.cfg, 1, context, absorbed=absorbed)

    def prefill_attn_flops(self, tokens: int) -> float:
        """One layer's attention over a `tokens`-token prompt (causal: each token attends to ~half of it)."""
        from model.flops import attention_flops

        return attention_flops(self.cfg, tokens, max(1, tokens // 2), absorbed=False)

    def dense_ffn_flops(self) -> float:
        from model.flops import ffn_flops

        return ffn_flops(self.cfg, 0, 1)

    def routed_flops(self) -> float:      # top_k experts of one token
        c = self.cfg
        return self.top_k * 6 * c.hidden_size * c.moe_intermediate_size

    def moe_other_flops(self) -> float:   # router + shared experts of one token
        c = self.cfg
        return 2 * c.hidden_size * c.n_routed_experts + c.n_shared_experts * 6 * c.hidden_size * c.moe_intermediate_size

    def head_flops(self) -> float:
        return 2 * self.cfg.hidden_size * self.cfg.vocab_size


def model_costs(cfg, quant: str = "nvfp4", cache_dtype: str = "bfloat16", name: str = "") -> ModelCosts:
    """Weight bytes by part from the abstract model of a 1 dense + 1 MoE layer cut of `cfg` (+ its MTP module) in
    the checkpoint representation `quant` ("bf16", "f32" (plain float32 weights, priced at the "bf16" matmul rate of
    the hardware: the CPU validation), "fp8" = DeepSeek block FP8, "nvfp4"/"mxfp4" = FP4 experts and
    FP8 other linears, NVIDIA's DeepSeek-R1-FP4 layout)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import checkpoints
    from sharding.plan import kv_bytes_per_token

    cut = cfg.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=1)
    plain = quant in ("bf16", "f32")
    q = None if plain else ("fp8" if quant == "fp8" else quant)
    m = checkpoints.abstract_model(cut, quant=q, fp8_linears=not plain,
                                   dtype=jnp.float32 if quant == "f32" else jnp.bfloat16)
    parts: dict[str, float] = {}
    for path, var in nnx.iter_graph(m):
        if not isinstance(var, nnx.Variable):
            continue
        name_ = ".".join(map(str, path))
        b = sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(var.get_value()))
        if name_.startswith("mtp.0.block."):
            continue                    # an MoE layer like layers.1: counted as one by `total_weight_bytes`
        if name_.startswith("layers.0."):
            key = "dense"
        elif name_.startswith("layers.1."):
            key = "experts" if ".experts_" in name_ else "moe_attn"
        elif name_.startswith("mtp."):
            key = "mtp_extra"
        elif name_.startswith("embed"):
            key = "embed"
        elif name_.startswith("lm_head"):
            key = "head"
        else:
            key = "norm"
        parts[key] = parts.get(key, 0.0) + b
    fmt = "fp4" if quant in ("nvfp4", "mxfp4", "nvfp4+dense") else ("fp8" if quant == "fp8" else "bf16")
    kv_layer = kv_bytes_per_token(cut.replace(num_nextn_predict_layers=0), "fp8" if cache_dtype == "fp8"
                                  else cache_dtype) / 2
    return ModelCosts(name or "model", cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_nextn_predict_layers,
                      cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, parts.get("dense", 0),
                      parts.get("moe_attn", 0), parts.get("experts", 0) / max(cfg.n_routed_experts, 1),
                      parts.get("embed", 0) + parts.get("norm", 0), parts.get("head", 0),
                      parts.get("mtp_extra", 0), kv_layer, fmt, "bf16" if plain else "fp8", cfg)
