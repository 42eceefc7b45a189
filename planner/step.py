"""Step times of decode and prefill on a layout: compute, HBM, collectives, kernels, fixed costs."""

from __future__ import annotations

import dataclasses

from planner.hardware import Efficiency, Hardware, ModelCosts
from planner.profile import StepProfile

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


def _roof(compute: float, memory: float, eff: Efficiency) -> float:
    """A layer's roofline time: compute and memory overlap (GPU), or add up (`Efficiency.serial`, XLA:CPU)."""
    return compute + memory if eff.serial else max(compute, memory)


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
    t_dense = _roof(t_dense_c, b_dense / hbm, eff)
    t_moe = _roof(t_moe_c, b_moe / hbm, eff)
    t_head = _roof(head / (hw.peak("bf16") * ce), (mc.head_bytes / tp + (mc.mtp_extra_bytes if mtp else 0)) / hbm, eff)
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
    t = _roof(t_c, t_m, eff) + t_w * (1 - eff.overlap_prefill) + lat + fixed
    return t, tokens / t / n
