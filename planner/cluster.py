"""Deployment simulation: xPyD and aggregated layouts -> TTFT, TPOT, tok/s/GPU, $/Mtok; Pareto; SLO sizing."""

from __future__ import annotations

import dataclasses
import math

from planner.hardware import Efficiency, Hardware, ModelCosts
from planner.profile import StepProfile
from planner.step import DecodeLayout, PrefillLayout, decode_step, prefill_time

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
