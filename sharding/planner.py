"""Planner and cluster simulator: predicted tok/s/GPU vs tok/s/user of xPyD layouts on H100/H200/B200/GB200 NVL72.

    python -m sharding.planner                                   # DeepSeek-R1 FP4, 1k/1k, HGX-B200 vs GB200 NVL72
    python -m sharding.planner --hardware=h200 --quant=fp8 --isl=4096 --osl=1024 --rate=20 --ttft_slo=2 --tpot_slo=0.05

A step's time on a device is built from what it must do, per device:

* **FLOPs** — the engine's own analytic count of every matmul (`model.flops`, checked against XLA's cost analysis
  of 1-step executables by `Engine.decode_cost`), split the way the pool's layout splits the work.
* **HBM bytes** — the weights the device holds (summed from the shard shapes of the abstract model in the
  chosen representation: FP8 `Fp8Tensor`, NVFP4 `QuantizedTensor`, bf16), of which a decode step reads the
  experts that some token of the step routes to (uniform routing), plus the latent KV it attends over.
* **Collective bytes** — read from the engine's compiled executables: the prefill and 1-step decode executables of
  an abstract real-dims model (1 dense + 1 MoE layer) are compiled on fake CPU devices and every collective of the
  partitioned HLO is counted (`StepProfile`); per-layer bytes per row are scaled to the pool's group size,
  rows and layer count. Groups inside an NVLink domain use its bandwidth, groups spanning domains the scale-out
  links for the off-domain share.

step = sum over layers of max(FLOPs / (peak x compute_eff), bytes / (HBM x hbm_eff))
       + collective time x (1 - overlap) + collective latency + kernels x kernel_overhead + step_overhead.

Every efficiency is a named field of `Efficiency` (docs/planner.md says why each default; all are a-priori values
but `kernel_overhead`, fitted to one published figure). Matmuls run at the tensor-core rate of the weight format
(W8A8 / W4A4, as TensorRT-LLM serves DeepSeek-R1-FP4); `--weight_only` models dequantize-in-kernel W8A16 / W4A16
instead (Tandem's Pallas kernels today: bf16 rate). The deployment
simulation turns step times into TTFT / TPOT / tok/s/GPU / tok/s/user / $ per Mtok for xPyD layouts and the
aggregated (colocated) baseline, finds the Pareto front and sizes pools for an SLO.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
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
    the checkpoint representation `quant` ("bf16", "fp8" = DeepSeek block FP8, "nvfp4"/"mxfp4" = FP4 experts and
    FP8 other linears, NVIDIA's DeepSeek-R1-FP4 layout)."""
    import jax
    import numpy as np
    from flax import nnx

    import checkpoints
    from sharding.plan import kv_bytes_per_token

    cut = cfg.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=1)
    q = None if quant == "bf16" else ("fp8" if quant == "fp8" else quant)
    m = checkpoints.abstract_model(cut, quant=q, fp8_linears=quant != "bf16")
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
                      parts.get("mtp_extra", 0), kv_layer, fmt, "bf16" if quant == "bf16" else "fp8", cfg)


# ---- collective bytes from compiled executables ----------------------------------------------------------------


@dataclasses.dataclass
class StepProfile:
    """Collective result bytes per device per row (decode) or per token (prefill), per layer kind and op, read
    from compiled executables of a real-dims 1 dense + 1 MoE layer cut. Float bytes are stored at 4 bytes per
    element (the profile compiles f32 activations: XLA:CPU would upcast bf16 collectives anyway) and scaled to
    the deployment's activation width; index bytes stay as they are."""

    model: str
    decode_ep: int
    decode_rows: list[int]                    # rows per device of the anchors
    decode: dict[str, dict[str, list[float]]]  # kind -> op -> [float bytes per row, other bytes per row]
    prefill_tp: int
    prefill_tokens: int
    prefill: dict[str, dict[str, list[float]]]  # kind -> op -> [float, other] bytes per token a device holds
    capacity_factor: float
    prefill_ep: int = 0
    prefill_ep_bytes: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)  # as prefill
    check: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "StepProfile":
        return cls(**d)


def _by_kind(colls: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Sum result bytes per (layer kind, op) of the normal path (the EP dispatch's exact fallback branch, taken
    only when a capacity bucket overflows, is left out)."""
    out: dict[str, dict[str, list[float]]] = {}
    for c in colls:
        name = c["op_name"]
        if "ep_fallback" in name:
            continue
        kind = "dense" if "layer0" in name else "moe" if ("layer1" in name or not name.startswith("jit(")) else "other"
        slot = out.setdefault(kind, {}).setdefault(c["op"], [0.0, 0.0])
        slot[0] += c["float_bytes"]
        slot[1] += c["other_bytes"]
    return out


def _compile_collectives(cfg, pool: str, mesh_spec: dict, *, rows: int = 0, tokens: int = 0,
                         capacity_factor: float = 2.0) -> tuple[dict, float, int]:
    """Compile one executable of an abstract f32 engine (1 dense + 1 MoE layer cut of cfg) on fake CPU devices and
    return (collective bytes by kind/op, compile seconds, devices)."""
    import jax.numpy as jnp

    import checkpoints
    from serving.engine import Engine, EngineConfig
    from sharding.hlo import collectives
    from sharding.rules import DECODE_RULES, PREFILL_RULES
    from sharding.topology import Topology

    n = math.prod(mesh_spec.values())
    cut = cfg.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    rules = DECODE_RULES if pool == "decode" else PREFILL_RULES
    import jax

    if len(jax.devices()) < n:
        raise RuntimeError(f"profiling a {pool} pool {mesh_spec} needs {n} devices; jax has {len(jax.devices())} "
                           f"(run through `python -m sharding.planner`, which sets the fake device count)")
    mesh = Topology.preset(f"cpu:{n}/1", devices=jax.devices()[:n]).allocate(pool, **mesh_spec)
    model = checkpoints.abstract_model(cut, dtype=jnp.float32, mesh=mesh, rules=rules, capacity_factor=capacity_factor)
    Z, L = 16, 256
    B = rows * n if pool == "decode" else 1
    ec = EngineConfig(page_size=Z, num_pages=n * (max(rows, 1) * (L // Z) + 2) + 1, max_model_len=L,
                      prefill_buckets=(tokens or 16,), decode_buckets=(max(B, 1),), decode_steps=1,
                      decode_windows=(L // Z,))
    eng = Engine(model, ec, mesh=mesh, roles={pool}, compile=False)
    t0 = time.perf_counter()
    low = eng._lower_decode(B, L // Z, 1) if pool == "decode" else eng.lowered()["prefill", 1, tokens]
    exe = low.compile()
    return _by_kind(collectives(exe.as_text(), n)), time.perf_counter() - t0, n


def build_profile(cfg, name: str, *, decode_ep: int = 8, rows: tuple[int, int] = (1, 8), prefill_tp: int = 8,
                  prefill_ep: int = 8, prefill_tokens: int = 256, check_ep: int = 4, capacity_factor: float = 2.0
                  ) -> StepProfile:
    """Compile the anchors: decode at ep=decode_ep with rows[0] and rows[1] rows per device (bytes per row = the
    slope), prefill at tp=prefill_tp and at ep=prefill_ep (the prompt's tokens split over the EP ranks), and a
    check: decode at ep=check_ep, predicted from the slope vs compiled."""
    t0 = time.perf_counter()
    (a, _, _), (b, _, _) = (_compile_collectives(cfg, "decode", dict(ep=decode_ep), rows=r,
                                                 capacity_factor=capacity_factor) for r in rows)
    dr = rows[1] - rows[0]
    decode = {k: {op: [(b[k][op][i] - a.get(k, {}).get(op, [0, 0])[i]) / dr for i in (0, 1)] for op in b[k]}
              for k in b}
    # per token a device holds: TP replicates the chunk's tokens on every device, EP splits them over the ranks
    per_token = lambda pf, t: {k: {op: [v[0] / t, v[1] / t] for op, v in d.items()} for k, d in pf.items()}
    pf, _, _ = _compile_collectives(cfg, "prefill", dict(tp=prefill_tp), tokens=prefill_tokens)
    pe, _, _ = _compile_collectives(cfg, "prefill", dict(ep=prefill_ep), tokens=prefill_tokens,
                                    capacity_factor=capacity_factor)
    prof = StepProfile(name, decode_ep, list(rows), decode, prefill_tp, prefill_tokens,
                       per_token(pf, prefill_tokens), capacity_factor, prefill_ep,
                       per_token(pe, prefill_tokens / prefill_ep))
    if check_ep:
        c, _, _ = _compile_collectives(cfg, "decode", dict(ep=check_ep), rows=rows[1], capacity_factor=capacity_factor)
        comp = sum(v[0] + v[1] for d in c.values() for v in d.values())
        pred = sum(v[0] + v[1] for d in decode.values() for v in d.values()) * rows[1]
        prof.check = {"ep": check_ep, "rows": rows[1], "compiled_bytes": comp, "predicted_bytes": pred,
                      "error": pred / comp - 1 if comp else 0.0}
    prof.compile_s = round(time.perf_counter() - t0, 1)
    return prof


# ---- step times --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepTime:
    seconds: float
    compute: float
    memory: float
    comm: float
    fixed: float
    hbm_bytes: float
    flops: float
    comm_bytes: float

    def parts(self) -> str:
        return (f"{self.seconds * 1e3:.2f} ms (roofline {self.compute * 1e3:.2f}: HBM {self.memory * 1e3:.2f}, "
                f"comm {self.comm * 1e3:.2f}, fixed {self.fixed * 1e3:.2f})")


def _comm_seconds(hw: Hardware, eff: Efficiency, wire: float, group: int) -> tuple[float, bool]:
    """Seconds for `wire` bytes per device over a group of `group` GPUs: inside a domain at NVLink speed; a group
    spanning domains sends the off-domain share over the NIC (the two run concurrently)."""
    if group <= 1 or wire <= 0:
        return 0.0, False
    if group <= hw.domain:
        return wire / (hw.nvlink_gbs * 1e9 * eff.nvlink), False
    off = (group - hw.domain) / (group - 1)
    return max(wire * off / (hw.scaleout_gbs * 1e9 * eff.scaleout),
               wire * (1 - off) / (hw.nvlink_gbs * 1e9 * eff.nvlink)), True


def _profile_wire(prof_kind: dict[str, list[float]], per: float, group: int, act_bytes: float,
                  scale_a2a: float = 1.0) -> tuple[float, int]:
    """Wire bytes per device of one layer's collectives (result bytes per row x rows, the float part at the
    deployment's activation width), and how many collectives."""
    from sharding.hlo import wire_factor

    wire, count = 0.0, 0
    for op, (fb, ob) in prof_kind.items():
        R = (fb * act_bytes / 4 * (scale_a2a if op == "all-to-all" else 1.0) + ob) * per
        wire += wire_factor(op, group) * R
        count += 1
    return wire, count


def executable_step(hw: Hardware, eff: Efficiency, flops: float, hbm_bytes: float, kernels: int, *,
                    kind: str = "bf16", compute_eff: float = 1.0, serial: bool = False) -> StepTime:
    """The same roofline + fixed-cost model for one compiled executable on one device with no collectives (the
    CPU validation: FLOPs from the executable's cost analysis, kernels counted in its HLO). serial: compute and
    memory time add up instead of overlapping (XLA:CPU runs one op at a time; a matmul-bound op and a
    bandwidth-bound op never share the step's time)."""
    c = flops / (hw.peak(kind) * compute_eff)
    m = hbm_bytes / (hw.hbm_gbs * 1e9 * eff.hbm)
    fixed = kernels * eff.kernel_overhead + eff.step_overhead
    roof = c + m if serial else max(c, m)
    return StepTime(roof + fixed, roof, m, 0.0, fixed, hbm_bytes, flops, 0.0)


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """One decode instance: DP attention over all `gpus` (each holds its rows' KV), routed experts over all of
    them (wide EP), heads over tp within a rank (tp=1: pure DP attention)."""

    gpus: int
    tp: int = 1

    @property
    def ranks(self) -> int:
        return self.gpus // self.tp

    def __str__(self):
        return f"DEP{self.gpus}" if self.tp == 1 else f"DP{self.ranks}xTP{self.tp}"


def decode_step(mc: ModelCosts, prof: StepProfile, hw: Hardware, lay: DecodeLayout, rows: int, context: int,
                eff: Efficiency, *, mtp: bool = False, act_bytes: float = 2.0, capacity_factor: float | None = None
                ) -> StepTime:
    """One decode step of `rows` sequences per attention rank (each `1 + mtp` query tokens) attending over
    `context` positions, on one GPU of the instance."""
    q = 2 if mtp else 1
    tok = rows * q                               # query tokens per rank
    n, R, tp = lay.gpus, lay.ranks, lay.tp
    cf = prof.capacity_factor if capacity_factor is None else capacity_factor
    moe_layers = mc.layers - mc.dense_layers + (1 if mtp else 0)
    # FLOPs per GPU
    attn = mc.attn_flops(context, absorbed=True) * tok / tp
    dense_ffn = mc.dense_ffn_flops() * tok / tp
    routed = mc.routed_flops() * tok * R / n * eff.ep_imbalance
    moe_other = mc.moe_other_flops() * tok / tp
    head = mc.head_flops() * tok / tp * (2 if mtp else 1)
    lin_peak, exp_peak = hw.peak(mc.linear_format), hw.peak(mc.expert_format)
    ce = eff.compute_decode
    t_dense_c = (attn + dense_ffn) / (lin_peak * ce)
    t_moe_c = (attn + moe_other) / (lin_peak * ce) + routed / (exp_peak * ce)
    # HBM bytes per GPU: the weights it holds that the step touches + the KV it attends over
    # an expert is read when some token of the instance routes to it (uniform routing: each token picks top_k)
    touched = 1.0 - (1.0 - mc.top_k / mc.experts) ** (tok * R)
    kv = rows * context * mc.kv_bytes_per_token_layer    # the latent has no head axis: tp ranks read it all
    b_dense = mc.dense_layer_bytes / tp + kv
    b_moe = mc.moe_attn_bytes / tp + mc.experts / n * mc.expert_bytes * touched + kv
    hbm = hw.hbm_gbs * 1e9 * eff.hbm
    t_dense = max(t_dense_c, b_dense / hbm)
    t_moe = max(t_moe_c, b_moe / hbm)
    t_head = max(head / (hw.peak("bf16") * ce), (mc.head_bytes / tp + (mc.mtp_extra_bytes if mtp else 0)) / hbm)
    # collectives: per-row bytes from the compiled profile, scaled to this instance. The EP dispatch runs among
    # the attention ranks (group R; its GPUs span all n); with tp > 1 each rank's heads, FFN widths and vocab are
    # split over tp and every layer all-reduces its rows' outputs: the TP prefill anchor's bytes per token held.
    w_moe, c_moe = _profile_wire(prof.decode.get("moe", {}), tok, R, act_bytes, cf / prof.capacity_factor)
    w_dense, c_dense = _profile_wire(prof.decode.get("dense", {}), tok, R, act_bytes)
    w_other, c_other = _profile_wire(prof.decode.get("other", {}), tok, R, act_bytes)
    wire = moe_layers * w_moe + mc.dense_layers * w_dense + w_other
    t_wire, cross = _comm_seconds(hw, eff, wire, n) if R > 1 else (0.0, False)
    ncoll = (moe_layers * c_moe + mc.dense_layers * c_dense + c_other) if R > 1 else 0
    lat = ncoll * (eff.collective_latency_out if cross else eff.collective_latency_in)
    if tp > 1:
        t_moe_w, t_c1 = _profile_wire(prof.prefill.get("moe", {}), tok, tp, act_bytes)
        t_dense_w, t_c2 = _profile_wire(prof.prefill.get("dense", {}), tok, tp, act_bytes)
        t_other_w, t_c3 = _profile_wire(prof.prefill.get("other", {}), tok, tp, act_bytes)
        tp_wire = moe_layers * t_moe_w + mc.dense_layers * t_dense_w + t_other_w
        t_wire += _comm_seconds(hw, eff, tp_wire, tp)[0]
        wire += tp_wire
        lat += (moe_layers * t_c1 + mc.dense_layers * t_c2 + t_c3) * eff.collective_latency_in
    kernels = (mc.layers + (1 if mtp else 0)) * eff.kernels_per_layer
    fixed = kernels * eff.kernel_overhead + eff.step_overhead + lat
    compute = mc.dense_layers * t_dense + (moe_layers) * t_moe + t_head
    comm = t_wire * (1 - eff.overlap_decode)
    mem = (mc.dense_layers * b_dense + moe_layers * b_moe + mc.head_bytes / tp) / hbm
    flops = mc.dense_layers * (attn + dense_ffn) + moe_layers * (attn + moe_other + routed) + head
    return StepTime(compute + comm + fixed, compute, mem, comm, fixed,
                    mc.dense_layers * b_dense + moe_layers * b_moe, flops, wire)


@dataclasses.dataclass(frozen=True)
class PrefillLayout:
    """One prefill instance: `gpus` GPUs as TP (heads, FFN width, vocab split; all-reduce per layer), EP (experts
    split, attention data-parallel over requests; all-to-all per MoE layer), or DWDP (each GPU prefills its own
    requests with the whole model, whose weights are spread over the domain and fetched layer by layer over
    NVLink: no collective on the critical path)."""

    gpus: int
    mode: str = "ep"      # "tp" | "ep" | "dwdp"

    def __str__(self):
        return f"{self.mode.upper()}{self.gpus}"


def prefill_time(mc: ModelCosts, prof: StepProfile, hw: Hardware, lay: PrefillLayout, isl: int, eff: Efficiency,
                 *, act_bytes: float = 2.0, batch: int | None = None) -> tuple[float, float]:
    """(seconds for one batch, tokens per second per GPU) when the instance prefills `batch` prompts of `isl`
    tokens at once (default: one per GPU)."""
    n = lay.gpus
    batch = n if batch is None else batch
    tokens = batch * isl
    layer_attn = mc.prefill_attn_flops(isl) * batch
    dense = mc.dense_layers * (layer_attn + mc.dense_ffn_flops() * tokens)
    moe = (mc.layers - mc.dense_layers) * (layer_attn + mc.moe_other_flops() * tokens)
    routed = (mc.layers - mc.dense_layers) * mc.routed_flops() * tokens
    head = mc.head_flops() * batch
    ce = eff.compute_prefill
    lin, exp = hw.peak(mc.linear_format) * ce, hw.peak(mc.expert_format) * ce
    imb = 1.0 if lay.mode == "dwdp" else eff.ep_imbalance
    t_c = ((dense + moe) / lin + routed * imb / exp + head / (hw.peak("bf16") * ce)) / n
    hbm = hw.hbm_gbs * 1e9 * eff.hbm
    w_dev = mc.total_weight_bytes / n if lay.mode != "dwdp" else mc.total_weight_bytes  # each GPU reads every layer
    t_m = w_dev / hbm
    fixed = mc.layers * eff.kernels_per_layer * eff.kernel_overhead
    if lay.mode == "dwdp":
        if n > hw.domain:
            raise ValueError(f"DWDP spreads weights over one NVLink domain ({hw.domain} GPUs on {hw.name}); {n} given")
        fetch = mc.total_weight_bytes * (n - 1) / n / (hw.nvlink_gbs * 1e9 * eff.nvlink)
        # prefetch of layer i+1 overlaps layer i: the step is bound by the slower of compute and fetch, per layer
        t = max(t_c, t_m, fetch) + fixed
        return t, tokens / t / n
    per_tok = tokens if lay.mode == "tp" else tokens / n     # tokens each device holds (see build_profile)
    kinds = prof.prefill if lay.mode == "tp" else prof.prefill_ep_bytes
    if lay.mode == "ep" and not kinds:
        raise ValueError("this step profile has no EP prefill anchor; rebuild it (--rebuild_profile)")
    w_moe, c1 = _profile_wire(kinds.get("moe", {}), per_tok, n, act_bytes)
    w_dense, c2 = _profile_wire(kinds.get("dense", {}), per_tok, n, act_bytes)
    w_other, c3 = _profile_wire(kinds.get("other", {}), per_tok, n, act_bytes)
    wire = (mc.layers - mc.dense_layers) * w_moe + mc.dense_layers * w_dense + w_other
    ncoll = (mc.layers - mc.dense_layers) * c1 + mc.dense_layers * c2 + c3
    t_w, cross = _comm_seconds(hw, eff, wire, n)
    lat = ncoll * (eff.collective_latency_out if cross else eff.collective_latency_in)
    t = max(t_c, t_m) + t_w * (1 - eff.overlap_prefill) + lat + fixed
    return t, tokens / t / n


# ---- deployment simulation ------------------------------------------------------------------------------------


# decode rows per attention rank tried: powers of two and their 1.5x (a front this dense reads off a target
# interactivity within a few %)
ROWS = tuple(sorted({2 ** i for i in range(11)} | {3 * 2 ** i for i in range(9)}))


@dataclasses.dataclass(frozen=True)
class Workload:
    isl: int = 1024
    osl: int = 1024
    isl_spread: float = 0.2   # ISL/OSL uniform in [(1 - spread) L, L] (the InferenceX protocol); means used
    mtp: bool = True
    mtp_acceptance: float = 0.75  # P(draft accepted); tokens per step = 1 + acceptance

    @property
    def mean_isl(self) -> float:
        return self.isl * (1 - self.isl_spread / 2)

    @property
    def mean_osl(self) -> float:
        return self.osl * (1 - self.isl_spread / 2)


@dataclasses.dataclass(frozen=True)
class Point:
    hardware: str
    mode: str                 # "disagg" | "agg"
    decode: str
    prefill: str
    prefill_gpus: int
    decode_gpus: int
    rows_per_rank: int        # decode rows per attention rank (= per GPU for DEP; a TP group shares them)
    mtp: bool
    tpot_s: float
    ttft_s: float
    tok_s_user: float
    tok_s_gpu: float
    usd_per_mtok: float
    step: str
    concurrency: int = 0      # requests in flight over the decode GPUs (decode rows of every instance)
    itl_s: float = 0.0        # gap between token deliveries: one step (with MTP a step delivers 1 or 2 tokens)
    itl_p99_s: float = 0.0    # aggregated: a step that carries a new prompt's whole chunk, when >= 1% of steps do


def kv_fits(mc: ModelCosts, hw: Hardware, lay: DecodeLayout, rows: int, max_len: int, eff: Efficiency,
            mtp: bool) -> bool:
    weights = (mc.dense_layers * mc.dense_layer_bytes + (mc.layers - mc.dense_layers + (1 if mtp else 0))
               * (mc.moe_attn_bytes + mc.experts * mc.expert_bytes / lay.gpus * lay.tp) + mc.embed_bytes
               + mc.head_bytes) / lay.tp
    kv = rows * max_len * mc.kv_bytes_per_token()     # a rank's pages, replicated over its tp ranks
    return weights + kv <= hw.hbm_bytes * eff.kv_memory_fraction


def best_prefill(mc, prof, hw, wl: Workload, eff: Efficiency, *, act_bytes=2.0, dwdp=False, modes=None,
                 max_batch_s: float = 1.0) -> tuple[PrefillLayout, float, float]:
    """(layout, batch seconds, tokens/s/GPU) of the prefill layout and batch (prompts per GPU: 1, 2, 4, ... 32)
    with the most tokens/s/GPU whose batch takes at most `max_batch_s` (it is part of TTFT) and whose weights fit."""
    best = None
    modes = modes or (("tp", "ep", "dwdp") if dwdp else ("tp", "ep"))
    for n in sorted({4, 8, 16, 32, hw.domain}):
        for mode in modes:
            if mode in ("tp", "dwdp") and n > hw.domain:
                continue
            held = mc.total_weight_bytes / n + (2 * mc.total_weight_bytes / mc.layers if mode == "dwdp" else 0)
            if held > hw.hbm_bytes * eff.kv_memory_fraction:
                continue
            lay = PrefillLayout(n, mode)
            for per_gpu in (1, 2, 4, 8, 16, 32):
                t, rate = prefill_time(mc, prof, hw, lay, int(wl.mean_isl), eff, act_bytes=act_bytes,
                                       batch=per_gpu * n)
                if t > max_batch_s and per_gpu > 1:
                    break
                if best is None or rate > best[2]:
                    best = (lay, t, rate)
    if best is None:
        raise ValueError(f"no prefill layout holds {mc.total_weight_bytes / 1e9:.0f} GB of weights on {hw.name}")
    return best


def decode_layouts(hw: Hardware, sizes) -> list[DecodeLayout]:
    """DEP n (DP attention over every GPU, wide EP) for each size, plus attention TP inside one domain: TP t
    (one rank) and DP x TP for t in 4, 8 — fewer rows per step but each GPU reads 1/t of the attention weights."""
    out = []
    for n in sizes:
        if n > 4 * hw.domain or (n > hw.domain and n % hw.domain):
            continue
        out.append(DecodeLayout(n))
        for t in (4, 8):
            if 1 < t <= min(n, hw.domain) and n % t == 0:
                out.append(DecodeLayout(n, t))
    return out


def simulate(mc: ModelCosts, prof: StepProfile, hw: Hardware, wl: Workload, eff: Efficiency = Efficiency(), *,
             act_bytes: float = 2.0, capacity_factor: float | None = None, dwdp: bool = False,
             decode_sizes: tuple[int, ...] | None = None, max_prefill_instances: int = 64) -> list[Point]:
    """Every (decode instance size, rows per GPU, MTP) point of disaggregated xPyD and aggregated serving on `hw`.

    Disaggregated: prefill instances of the best prefill layout feed decode instances; for y decode instances the
    smallest x prefill instances whose load stays under `prefill_util`. Aggregated: every GPU of a DEP instance also
    prefills, so each decode step carries the prompt tokens of the rows that finish and restart (chunked
    prefill): step = decode step + that prefill work."""
    sizes = decode_sizes or tuple(sorted({s for s in (1, 2, 4, 8, 16, 32, 36, 64, 72, 128) if s <= 4 * hw.domain
                                         and (s <= hw.domain or s % hw.domain == 0) and s >= 1}))
    layouts = decode_layouts(hw, sizes)
    p_lay, p_t, p_rate = best_prefill(mc, prof, hw, wl, eff, act_bytes=act_bytes, dwdp=dwdp)
    isl, osl = wl.mean_isl, wl.mean_osl
    ctx = int(isl + osl / 2)
    max_len = wl.isl + wl.osl
    out: list[Point] = []
    for lay in layouts:
        n = lay.gpus
        for mtp in ((False, True) if wl.mtp else (False,)):
            tps = 1 + (wl.mtp_acceptance if mtp else 0.0)         # tokens per row per step
            for rows in ROWS:
                if not kv_fits(mc, hw, lay, rows, max_len, eff, mtp):
                    break
                st = decode_step(mc, prof, hw, lay, rows, ctx, eff, mtp=mtp, act_bytes=act_bytes,
                                 capacity_factor=capacity_factor)
                tpot = st.seconds / tps
                dec_rate = rows * lay.ranks / tpot                 # output tokens/s of the instance
                req_rate = dec_rate / osl
                # disaggregated: x prefill instances per y decode instances
                best = None
                for y in (1, 2, 4, 8):
                    need = req_rate * y * isl / (p_rate * p_lay.gpus * eff.prefill_util)
                    x = max(1, math.ceil(need - 1e-9))
                    if x > max_prefill_instances:
                        continue
                    gpus = x * p_lay.gpus + y * n
                    tsg = y * dec_rate / gpus
                    if best is None or tsg > best[0]:
                        best = (tsg, x, y)
                if best is not None:
                    tsg, x, y = best
                    u = req_rate * y * isl / (x * p_lay.gpus * p_rate)
                    service = p_t                                     # the batch holding the prompt
                    wait = u / (2 * (1 - u)) * service if u < 1 else float("inf")
                    kv_move = isl * mc.kv_bytes_per_token() / (hw.scaleout_gbs * 1e9 * eff.scaleout)
                    ttft = service + wait + kv_move + st.seconds
                    out.append(Point(hw.name, "disagg", str(lay), str(p_lay), x * p_lay.gpus, y * n, rows, mtp, tpot,
                                     ttft, 1 / tpot, tsg, _usd(hw, tsg), st.parts(), rows * lay.ranks * y,
                                     st.seconds, st.seconds))
                # aggregated: the same instance also prefills isl tokens per finished row
                pf_tok_per_gpu_step = rows * tps / osl * isl / lay.tp   # a rank's prompts, over its tp GPUs
                t_pf = _agg_prefill_seconds(mc, prof, hw, n, pf_tok_per_gpu_step, int(isl), eff, act_bytes)
                step = st.seconds + t_pf
                tpot_a = step / tps
                tsg_a = rows * lay.ranks / n / tpot_a
                # a new prompt is prefilled as one chunk in the next step, on its rank's tp GPUs; every row of that
                # rank waits for it (the interference tail disaggregation removes)
                chunk = _agg_prefill_seconds(mc, prof, hw, n, isl / lay.tp, int(isl), eff, act_bytes)
                ttft_a = step + chunk
                arrivals = rows * tps / osl                  # new prompts per step on one rank
                itl_p99 = st.seconds + chunk if arrivals >= 0.01 else step
                out.append(Point(hw.name, "agg", str(lay), f"chunked in {lay}", 0, n, rows, mtp, tpot_a, ttft_a,
                                 1 / tpot_a, tsg_a, _usd(hw, tsg_a), st.parts(), rows * lay.ranks, step, itl_p99))
    return out


def _agg_prefill_seconds(mc, prof, hw, n, tokens_per_gpu, isl, eff, act_bytes) -> float:
    """Prefill work added to a step of an aggregated DEP instance: `tokens_per_gpu` prompt tokens per GPU — their
    compute at the prefill efficiency and their EP all-to-all bytes. Not the weights (the decode step streams them
    already) and no extra kernels or collective latencies: chunked prefill rides in the decode step's kernels."""
    if tokens_per_gpu <= 0:
        return 0.0
    no_fixed = eff.replace(hbm=float("inf"), kernel_overhead=0.0, collective_latency_in=0.0,
                           collective_latency_out=0.0)
    t_var, _ = prefill_time(mc, prof, hw, PrefillLayout(n, "ep"), isl, no_fixed, act_bytes=act_bytes)
    return t_var * tokens_per_gpu / isl        # prefill_time's batch holds isl tokens per GPU


def _usd(hw: Hardware, tok_s_gpu: float) -> float:
    return hw.usd_per_gpu_hour / (3600 * tok_s_gpu / 1e6) if tok_s_gpu > 0 else float("inf")


def pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats on both tok/s/user and tok/s/GPU, by increasing tok/s/user."""
    pts = sorted(points, key=lambda p: (-p.tok_s_user, -p.tok_s_gpu))
    front, best = [], -1.0
    for p in pts:
        if p.tok_s_gpu > best:
            front.append(p)
            best = p.tok_s_gpu
    return sorted(front, key=lambda p: p.tok_s_user)


def at_interactivity(points: list[Point], tok_s_user: float) -> Point | None:
    """The most tok/s/GPU among points at least `tok_s_user` interactive."""
    ok = [p for p in points if p.tok_s_user >= tok_s_user]
    return max(ok, key=lambda p: p.tok_s_gpu) if ok else None


def size_for_slo(mc, prof, hw, wl: Workload, eff: Efficiency, *, rate: float, ttft_slo: float, tpot_slo: float,
                 act_bytes: float = 2.0, dwdp: bool = False) -> dict:
    """Pool sizes for `rate` requests/s meeting a TTFT and TPOT SLO (Dynamo-planner-style): the decode point
    with the most tok/s/GPU whose TPOT meets the SLO sets the decode pool; then the fewest prefill instances
    whose queueing TTFT meets its SLO."""
    p_lay, _, p_rate = best_prefill(mc, prof, hw, wl, eff, act_bytes=act_bytes, dwdp=dwdp)
    isl, osl = wl.mean_isl, wl.mean_osl
    best = None
    for lay in decode_layouts(hw, (1, 2, 4, 8, 16, 32, 64, 72)):
        n = lay.gpus
        for mtp in ((False, True) if wl.mtp else (False,)):
            tps = 1 + (wl.mtp_acceptance if mtp else 0.0)
            for rows in ROWS:
                if not kv_fits(mc, hw, lay, rows, wl.isl + wl.osl, eff, mtp):
                    break
                st = decode_step(mc, prof, hw, lay, rows, int(isl + osl / 2), eff, mtp=mtp, act_bytes=act_bytes)
                tpot = st.seconds / tps
                if tpot > tpot_slo:
                    continue
                per_instance = rows * lay.ranks / tpot / osl    # requests/s one instance completes
                y = math.ceil(rate / per_instance)
                if best is None or y * n < best["decode_gpus"]:
                    best = dict(decode=str(lay), rows_per_rank=rows, mtp=mtp, decode_instances=y, decode_gpus=y * n,
                                tpot_s=tpot)
    if best is None:
        raise ValueError(f"no decode layout on {hw.name} meets TPOT <= {tpot_slo * 1e3:.0f} ms")
    service = prefill_time(mc, prof, hw, p_lay, int(isl), eff, act_bytes=act_bytes)[0]
    kv_move = isl * mc.kv_bytes_per_token() / (hw.scaleout_gbs * 1e9 * eff.scaleout)
    for x in range(1, 10 ** 4):
        u = rate * isl / (x * p_lay.gpus * p_rate)
        if u >= 1:
            continue
        ttft = service + u / (2 * (1 - u)) * service + kv_move
        if ttft <= ttft_slo:
            gpus = x * p_lay.gpus + best["decode_gpus"]
            return dict(best, prefill=str(p_lay), prefill_instances=x, prefill_gpus=x * p_lay.gpus, ttft_s=ttft,
                        total_gpus=gpus, usd_per_hour=gpus * hw.usd_per_gpu_hour,
                        usd_per_mtok=gpus * hw.usd_per_gpu_hour / (3600 * rate * osl / 1e6))
    raise ValueError(f"TTFT <= {ttft_slo:g} s cannot be met: one {isl:.0f}-token prefill alone takes {service:.3f} s")


# ---- CLI ------------------------------------------------------------------------------------------------------

# Published figures the planner is checked against (docs/planner.md): DeepSeek-R1 FP4, ISL/OSL 1k/1k, tok/s/GPU at
# ~125 tok/s/user (SemiAnalysis InferenceMAX, as quoted in the seed notes).
PUBLISHED = {"interactivity": 125.0, "gb200": 4130.0, "b200": 941.0}
DEFAULT_PROFILE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "planner")


def profile_name(cfg) -> str:
    """Profiles depend on the architecture's dimensions, not its weights: DeepSeek-V3 and R1 share one."""
    from model.config import preset

    v3 = preset("deepseek-v3")
    keys = ("hidden_size", "n_routed_experts", "num_experts_per_tok", "num_attention_heads", "kv_lora_rank",
            "q_lora_rank", "moe_intermediate_size", "intermediate_size", "vocab_size", "n_shared_experts")
    if all(getattr(cfg, k) == getattr(v3, k) for k in keys):
        return "deepseek-v3"
    return "arch-" + "-".join(str(getattr(cfg, k)) for k in keys)


def load_profile(cfg, name: str, path: str | None = None, rebuild: bool = False, **kw) -> StepProfile:
    """The step profile of `name` from `path` (default assets/planner/<name>.json); compiled and written there when
    missing or `rebuild`."""
    path = path or os.path.join(DEFAULT_PROFILE_DIR, f"{name}.json")
    if os.path.exists(path) and not rebuild:
        with open(path) as f:
            return StepProfile.from_json(json.load(f))
    prof = build_profile(cfg, name, **kw)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(prof.to_json(), f, indent=1)
    return prof


# fields a published figure may be fitted with, and the range searched
FIT_RANGES = {"kernel_overhead": (1.5e-6, 50e-6), "compute_decode": (0.02, 0.4), "hbm": (0.05, 0.8),
              "step_overhead": (3e-4, 0.02), "collective_latency_in": (8e-6, 400e-6)}


def fit_published(mc, prof, wl: Workload, eff: Efficiency, *, fit_on: str = "b200", check: str = "gb200",
                  points: int = 40, fields: tuple[str, ...] | None = None, **kw) -> list[dict]:
    """For each field of FIT_RANGES alone: the value (of `points` log-spaced in its range) at which the best
    tok/s/GPU at the published interactivity on `fit_on` comes closest to its published figure — kept if within
    3% (the front moves in steps: rows per GPU are powers of two) — and what `check` is then predicted at."""
    def best(hw, e):
        p = at_interactivity(simulate(mc, prof, HARDWARE[hw], wl, e, **kw), PUBLISHED["interactivity"])
        return p.tok_s_gpu if p else 0.0

    target, out = PUBLISHED[fit_on], []
    for field in fields or tuple(FIT_RANGES):
        lo, hi = FIT_RANGES[field]
        vals = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
        got = [(abs(best(fit_on, eff.replace(**{field: v})) / target - 1), v) for v in vals]
        err, v = min(got)
        row = {"field": field, "value": None, "closest_err": err}
        if err < 0.03:
            e = eff.replace(**{field: v})
            pred = best(check, e)
            row.update(value=v, fit=best(fit_on, e), check=pred, check_err=pred / PUBLISHED[check] - 1)
        out.append(row)
    return out


def _args(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sharding.planner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-r1")
    ap.add_argument("--quant", default="nvfp4", choices=["bf16", "fp8", "nvfp4", "mxfp4"])
    ap.add_argument("--hardware", default="b200,gb200", help=f"comma list of {sorted(HARDWARE)}")
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=1024)
    ap.add_argument("--mtp_acceptance", type=float, default=0.75)
    ap.add_argument("--no_mtp", action="store_true")
    ap.add_argument("--cache_dtype", default="fp8", choices=["bfloat16", "fp8"])
    ap.add_argument("--act_bytes", type=float, default=2.0, help="bytes per activation element on the wire")
    ap.add_argument("--capacity_factor", type=float, default=None, help="EP dispatch capacity factor (default: the "
                    "profile's, i.e. Tandem's engine default; 1 = a ragged dispatch sending only routed rows)")
    ap.add_argument("--weight_only", action="store_true", help="matmuls at the bf16 rate (W8A16/W4A16 kernels that "
                    "dequantize in the kernel, as Tandem's today) instead of the weight format's tensor-core rate")
    ap.add_argument("--dwdp", action="store_true", help="allow DWDP prefill (distributed weights, data-parallel)")
    ap.add_argument("--price", action="append", default=[], help="name=usd per GPU-hour override")
    ap.add_argument("--eff", action="append", default=[], help="Efficiency field override, e.g. hbm=0.7")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s to size pools for (with the SLOs)")
    ap.add_argument("--ttft_slo", type=float, default=2.0)
    ap.add_argument("--tpot_slo", type=float, default=0.02)
    ap.add_argument("--profile", default="", help="step profile JSON (default assets/planner/<model>.json)")
    ap.add_argument("--rebuild_profile", action="store_true", help="compile the anchors again (about a minute)")
    ap.add_argument("--fit_published", action="store_true", help="fit each efficiency field alone to the published "
                    "B200 figure and print the GB200 figure it then predicts (the sensitivity in docs/planner.md)")
    ap.add_argument("--json_out", default="runs/planner.json")
    ap.add_argument("--png_out", default="runs/planner.png")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = _args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        jax.config.update("jax_num_cpu_devices", 8)   # fake devices for profiling the anchors (when needed)
    from model.config import ModelConfig, preset, presets

    t0 = time.perf_counter()
    if a.model in presets():
        cfg = preset(a.model)
    elif os.path.exists(os.path.join(a.model, "config.json")):
        cfg = ModelConfig.from_hf(a.model)
    else:
        raise SystemExit(f"--model {a.model!r}: not a preset ({', '.join(presets())}) nor an HF checkpoint directory")
    fields = {f.name: f.type for f in dataclasses.fields(Efficiency)}
    overrides = {}
    for e in a.eff:
        k, _, v = e.partition("=")
        if k not in fields or not v:
            raise SystemExit(f"--eff {e!r}: expected name=value with name one of {sorted(fields)}")
        overrides[k] = int(v) if fields[k] in ("int", int) else float(v)
    eff = Efficiency().replace(**overrides)
    prices = {}
    for p in a.price:
        k, _, v = p.partition("=")
        if k not in HARDWARE or not v:
            raise SystemExit(f"--price {p!r}: expected name=usd with name one of {sorted(HARDWARE)}")
        prices[k] = float(v)
    hws = []
    for h in a.hardware.split(","):
        if h not in HARDWARE:
            raise SystemExit(f"unknown hardware {h!r}; known: {sorted(HARDWARE)}")
        hw = HARDWARE[h]
        hws.append(dataclasses.replace(hw, usd_per_gpu_hour=prices[h]) if h in prices else hw)
    prof = load_profile(cfg, profile_name(cfg), a.profile or None, a.rebuild_profile)
    mc = model_costs(cfg, a.quant, a.cache_dtype, a.model)
    if a.weight_only:
        mc = dataclasses.replace(mc, expert_format="bf16", linear_format="bf16")
    wl = Workload(a.isl, a.osl, mtp=not a.no_mtp, mtp_acceptance=a.mtp_acceptance)
    print(f"{a.model} {a.quant}: {mc.total_weight_bytes / 1e9:.0f} GB of weights, KV "
          f"{mc.kv_bytes_per_token() / 1e3:.1f} kB/token ({a.cache_dtype}); ISL/OSL {a.isl}/{a.osl}; "
          f"MTP acceptance {wl.mtp_acceptance if wl.mtp else 0}")
    print(f"profile: compiled collectives per row, decode DEP{prof.decode_ep} / prefill TP{prof.prefill_tp} "
          f"(check at ep={prof.check.get('ep')}: predicted/compiled bytes - 1 = {prof.check.get('error', 0):+.1%})")
    result: dict[str, Any] = {"model": a.model, "quant": a.quant, "isl": a.isl, "osl": a.osl,
                              "efficiency": dataclasses.asdict(eff), "hardware": {}}
    fronts = {}
    for hw in hws:
        pts = simulate(mc, prof, hw, wl, eff, act_bytes=a.act_bytes, capacity_factor=a.capacity_factor, dwdp=a.dwdp)
        p_lay, p_t, p_rate = best_prefill(mc, prof, hw, wl, eff, act_bytes=a.act_bytes, dwdp=a.dwdp)
        r: dict[str, Any] = {"prefill": str(p_lay), "prefill_tok_s_gpu": p_rate}
        if a.dwdp:
            base = best_prefill(mc, prof, hw, wl, eff, act_bytes=a.act_bytes, dwdp=False)
            dw = best_prefill(mc, prof, hw, wl, eff, act_bytes=a.act_bytes, modes=("dwdp",))
            r["dwdp_prefill_gain"] = dw[2] / base[2] - 1
            r["dwdp"] = {"layout": str(dw[0]), "batch_s": dw[1], "tok_s_gpu": dw[2], "vs": str(base[0]),
                         "vs_tok_s_gpu": base[2]}
        for mode in ("disagg", "agg"):
            front = pareto([p for p in pts if p.mode == mode])
            fronts[hw.name, mode] = front
            r[mode] = [dataclasses.asdict(p) for p in front]
        print(f"\n## {hw.system}: prefill {p_lay} at {p_rate:,.0f} tok/s/GPU" +
              (f" (DWDP {r['dwdp']['layout']} {r['dwdp']['tok_s_gpu']:,.0f} tok/s/GPU vs {r['dwdp']['vs']} "
                f"{r['dwdp']['vs_tok_s_gpu']:,.0f}: {r['dwdp_prefill_gain']:+.1%})" if a.dwdp else ""))
        print("| mode | tok/s/user | tok/s/GPU | $/Mtok | TPOT ms | ITL mean / p99 ms | TTFT s | concurrency | "
              "layout | rows/rank | MTP | decode step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for mode in ("disagg", "agg"):
            for p in fronts[hw.name, mode]:
                lay = f"{p.prefill_gpus} P ({p.prefill}) + {p.decode_gpus} D ({p.decode})" if mode == "disagg" \
                    else f"{p.decode_gpus} ({p.decode})"
                print(f"| {mode} | {p.tok_s_user:.0f} | {p.tok_s_gpu:,.0f} | {p.usd_per_mtok:.3f} | "
                      f"{p.tpot_s * 1e3:.1f} | {p.itl_s * 1e3:.1f} / {p.itl_p99_s * 1e3:.1f} | {p.ttft_s:.2f} | "
                      f"{p.concurrency} | {lay} | {p.rows_per_rank} | {'y' if p.mtp else 'n'} | {p.step} |")
        r["at_125"] = {}
        for mode in ("disagg", "agg"):
            p = at_interactivity([q for q in pts if q.mode == mode], PUBLISHED["interactivity"])
            r["at_125"][mode] = p.tok_s_gpu if p else None
        r["at_125"]["best"] = max((v for v in r["at_125"].values() if v), default=None)
        if a.rate:
            r["slo"] = size_for_slo(mc, prof, hw, wl, eff, rate=a.rate, ttft_slo=a.ttft_slo, tpot_slo=a.tpot_slo,
                                    act_bytes=a.act_bytes, dwdp=a.dwdp)
            s = r["slo"]
            print(f"\nSLO sizing for {a.rate:g} req/s (TTFT <= {a.ttft_slo:g} s, TPOT <= {a.tpot_slo * 1e3:g} ms): "
                  f"{s['prefill_instances']} x {s['prefill']} prefill + {s['decode_instances']} x {s['decode']} decode"
                  f" ({s['rows_per_rank']} rows per attention rank, MTP {'on' if s['mtp'] else 'off'}) = "
                  f"{s['total_gpus']} GPUs, "
                  f"TTFT {s['ttft_s']:.2f} s, TPOT {s['tpot_s'] * 1e3:.1f} ms, ${s['usd_per_mtok']:.3f}/Mtok")
        result["hardware"][hw.name] = r
    # published comparison (DeepSeek-R1 FP4 1k/1k): tok/s/GPU at 125 tok/s/user
    hw_names = [h.name for h in hws]
    if "b200" in hw_names and "gb200" in hw_names:
        g, b = result["hardware"]["gb200"]["at_125"]["best"], result["hardware"]["b200"]["at_125"]["best"]
        cmp = {"gb200_pred": g, "b200_pred": b, "gb200_pub": PUBLISHED["gb200"], "b200_pub": PUBLISHED["b200"]}
        if g and b:
            cmp.update(ratio_pred=g / b, ratio_pub=PUBLISHED["gb200"] / PUBLISHED["b200"],
                       gb200_err=g / PUBLISHED["gb200"] - 1, b200_err=b / PUBLISHED["b200"] - 1)
            print(f"\nAt {PUBLISHED['interactivity']:.0f} tok/s/user (best of disaggregated and aggregated): "
                  f"GB200 NVL72 {g:,.0f} tok/s/GPU "
                  f"(published ~{PUBLISHED['gb200']:,.0f}, {cmp['gb200_err']:+.0%}), HGX B200 {b:,.0f} (published "
                  f"~{PUBLISHED['b200']:,.0f}, {cmp['b200_err']:+.0%}); ratio {cmp['ratio_pred']:.2f}x (published "
                  f"~{cmp['ratio_pub']:.2f}x)")
        result["published"] = cmp
    if a.fit_published:
        rows = fit_published(mc, prof, wl, eff, act_bytes=a.act_bytes, capacity_factor=a.capacity_factor, dwdp=a.dwdp)
        result["fit_published"] = rows
        print(f"\nOne field fitted to the published B200 figure ({PUBLISHED['b200']:,.0f}), everything else as set:")
        print("| field | fitted value | B200 | GB200 predicted | vs published GB200 |")
        print("|---|---|---|---|---|")
        for r in rows:
            if r["value"] is None:
                print(f"| {r['field']} | none within 3% (closest {r['closest_err']:+.0%} off) | | | |")
            else:
                print(f"| {r['field']} | {r['value']:.4g} | {r['fit']:,.0f} | {r['check']:,.0f} | "
                      f"{r['check_err']:+.0%} |")
    for hw in hws:
        r = result["hardware"][hw.name]["at_125"]
        if r["disagg"] and r["agg"]:
            print(f"{hw.name}: disaggregated / aggregated at 125 tok/s/user: {r['disagg'] / r['agg']:.2f}x")
    if a.json_out:
        os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=1, default=float)
    if a.png_out:
        plot(fronts, a.png_out, f"{a.model} {a.quant} ISL/OSL {a.isl}/{a.osl} (predicted)")
    print(f"\nwrote {a.json_out} {a.png_out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return result


def plot(fronts: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (hw, mode), front in fronts.items():
        if not front:
            continue
        ax.plot([p.tok_s_user for p in front], [p.tok_s_gpu for p in front], marker="o", ms=3,
                ls="-" if mode == "disagg" else "--", label=f"{hw} {mode}")
    for k, v in PUBLISHED.items():
        if k != "interactivity":
            ax.scatter([PUBLISHED["interactivity"]], [v], marker="x", color="k")
            ax.annotate(f"{k} published", (PUBLISHED["interactivity"], v), fontsize=7)
    ax.set_xlabel("tok/s/user")
    ax.set_ylabel("tok/s/GPU")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
