"""`python -m planner predict`: one given deployment at one load — this prefill pool, this decode pool, this many
concurrent clients — rather than the best layout per interactivity.

    python -m planner predict --hardware b200 --prefill 4:tp4 --decode 40:ep8 --concurrency 180 \\
        --isl 1024 --osl 1024 --quant nvfp4 --mtp
    python -m planner predict --hardware gb200 --prefill 2:ep8 --decode 1:ep32 --concurrency 2048 \\
        --expert_load runs/counts.json --redundant_experts 32      # EP imbalance from measured routing

Pools are COUNTxLAYOUT: prefill `tpN` / `epN` / `dwdpN` (one instance of N GPUs), decode `epN` (DEP N: DP attention
over N GPUs, wide EP), `dpRtpT` (R attention ranks of T GPUs), `tpN`; `--prefill 0` means aggregated (the decode
instances prefill too, chunked into their steps). The step times are `planner.step`'s (the functions validated
against this CPU's executables, bench.planner_cpu) with `Efficiency` as given — nothing is fitted here.

Load model: a closed loop of C clients, each sending its next request when the previous one ends (the benchmark
clients of InferenceX / vLLM's bench). With request rate λ: decode holds N_d = λ x OSL x TPOT requests (Little),
so rows per attention rank r = N_d / (instances x ranks) and TPOT = step(r) / tokens per step; TTFT = one prompt's
prefill + queueing behind full batches at utilisation u = λ / prefill capacity (M/D/1 wait; capacity at the batch
with the most tokens/s within 1 s) + KV transfer + the first decode step. C = λ x
(TTFT + OSL x TPOT) is solved for λ by bisection (an inner fixed point for r).

EP imbalance (the busiest EP rank's routed work over the mean) is the `Efficiency` default unless routing counts are
given (`--expert_load`: JSON {"counts": [[...]]} or a list [layers][experts], e.g. `ExpertStats.counts()` of an
engine; or `--zipf S`, Zipf-like popularity): then it is computed for the decode EP group with the uniform placement,
or with `--redundant_experts R` the EPLB placement (`sharding.eplb.choose_placement`) the engine would use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from planner.cluster import Workload, _agg_prefill_seconds, kv_fits
from planner.hardware import HARDWARE, Efficiency, Hardware, ModelCosts
from planner.profile import StepProfile
from planner.step import DecodeLayout, PrefillLayout, decode_step, prefill_time


def parse_pool(spec: str, kind: str) -> tuple[int, PrefillLayout | DecodeLayout] | None:
    """"COUNT:LAYOUT" -> (count, layout); "0" -> None (aggregated, prefill only). Errors name the problem."""
    spec = spec.strip().lower()
    if kind == "prefill" and spec in ("0", "none", "agg"):
        return None
    m = re.fullmatch(r"(\d+)[:x](.+)", spec)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"--{kind} {spec!r}: expected COUNT:LAYOUT with COUNT >= 1, e.g. 4:tp4 or 40:ep8")
    count, lay = int(m.group(1)), m.group(2)
    if kind == "prefill":
        p = re.fullmatch(r"(tp|ep|dwdp)(\d+)", lay)
        if not p or int(p.group(2)) < 1:
            raise ValueError(f"--prefill layout {lay!r}: expected tpN, epN or dwdpN")
        return count, PrefillLayout(int(p.group(2)), p.group(1))
    d = re.fullmatch(r"(?:ep|dep)(\d+)|dp(\d+)tp(\d+)|tp(\d+)", lay)
    if not d:
        raise ValueError(f"--decode layout {lay!r}: expected epN (DEP N), dpRtpT or tpN")
    if d.group(1):
        return count, DecodeLayout(int(d.group(1)))
    if d.group(2):
        r, t = int(d.group(2)), int(d.group(3))
        return count, DecodeLayout(r * t, t)
    n = int(d.group(4))
    return count, DecodeLayout(n, n)


# ---- EP imbalance from routing counts ------------------------------------------------------------------------------
def zipf_load(experts: int, s: float, layers: int = 58, seed: int = 0) -> np.ndarray:
    """Expected copies [layers, experts] with Zipf-like popularity (exponent s) in a random order per layer."""
    rng = np.random.default_rng(seed)
    return np.stack([1e4 / (rng.permutation(experts) + 1.0) ** s for _ in range(layers)])


def read_load(path: str) -> np.ndarray:
    """Routing counts [layers, experts] from JSON ({"counts": ...} or the list) or .npy; errors name the file."""
    try:
        if path.endswith(".npy"):
            a = np.load(path)
        else:
            with open(path) as f:
                d = json.load(f)
            a = np.asarray(d["counts"] if isinstance(d, dict) else d, np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--expert_load {path}: {e}") from None
    if a.ndim != 2 or a.shape[1] < 2 or (a < 0).any():
        raise ValueError(f"--expert_load {path}: expected non-negative counts [layers, experts], got shape {a.shape}")
    return a


def ep_imbalance(load_LE, ranks: int, *, redundant: int = 0, domains: int = 1, groups: int = 1) -> float:
    """The step's routed work on its busiest rank over the mean, over `ranks` EP ranks: per layer max/mean copies
    per rank (uniform placement, or EPLB's with `redundant` slots), averaged with the layers' loads as weights."""
    from sharding import eplb

    load = np.asarray(load_LE, np.float64)
    E = load.shape[1]
    if ranks <= 1:
        return 1.0
    P = E + redundant
    if P % ranks:
        raise ValueError(f"{P} expert slots do not split over {ranks} EP ranks")
    vals, weights = [], []
    for row in load:
        if row.sum() <= 0:
            continue
        if redundant:
            placed = eplb.choose_placement(row, P, ranks, n_domains=domains if ranks % domains == 0 else 1,
                                           n_groups=groups)
        else:   # one copy per expert, E / ranks consecutive experts per rank (the EP dispatch's split)
            placed = np.arange(E)
        vals.append(eplb.imbalance(placed, row, ranks))
        weights.append(row.sum())
    return float(np.average(vals, weights=weights)) if vals else 1.0


# ---- one deployment at one load -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prediction:
    concurrency: int
    request_rate: float       # requests/s completed
    tok_s: float              # output tokens/s of the deployment
    tok_s_gpu: float          # output tokens/s per GPU (prefill + decode GPUs)
    tok_s_user: float         # 1 / TPOT
    ttft_s: float
    tpot_s: float
    rows_per_rank: float      # decode rows per attention rank (mean)
    prefill_util: float       # of the prefill pool (aggregated: 0)
    gpus: int
    ep_imbalance: float
    decode_step: str
    kv_fits: bool             # the rows' KV fits the decode GPUs (else requests would wait for pages)
    bound: str                # what sets the rate: "clients" (the closed loop) or "prefill" (its capacity)


def _prefill_capacity(mc, prof, hw, lay: PrefillLayout, isl: int, eff, act_bytes, max_batch_s=1.0):
    """(batch seconds, prompts/s of one instance) at the batch (prompts per GPU 1..32) with the most tokens/s whose
    batch takes at most `max_batch_s`."""
    best = None
    for per_gpu in (1, 2, 4, 8, 16, 32):
        t, rate = prefill_time(mc, prof, hw, lay, isl, eff, act_bytes=act_bytes, batch=per_gpu * lay.gpus)
        if t > max_batch_s and per_gpu > 1:
            break
        if best is None or rate > best[1] * isl / lay.gpus:
            best = (t, rate * lay.gpus / isl)
    return best


def predict(mc: ModelCosts, prof: StepProfile, hw: Hardware, wl: Workload, eff: Efficiency, *,
            prefill: tuple[int, PrefillLayout] | None, decode: tuple[int, DecodeLayout], concurrency: int,
            act_bytes: float = 2.0, capacity_factor: float | None = None) -> Prediction:
    """The steady state of `concurrency` closed-loop clients on the deployment (see the module docstring)."""
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    y, d_lay = decode
    isl, osl = wl.mean_isl, wl.mean_osl
    mtp = wl.mtp
    tps = 1 + (wl.mtp_acceptance if mtp else 0.0)
    ranks = y * d_lay.ranks
    ctx = int(isl + osl / 2)

    def step(rows: float) -> tuple[float, object]:
        st = decode_step(mc, prof, hw, d_lay, max(rows, 1e-3), ctx, eff, mtp=mtp, act_bytes=act_bytes,
                         capacity_factor=capacity_factor)
        if prefill is not None:
            return st.seconds, st
        # aggregated: each step also prefills the prompts of the rows that finished (chunked into the step)
        pf = rows * tps / osl * isl / d_lay.tp
        return st.seconds + _agg_prefill_seconds(mc, prof, hw, d_lay.gpus, pf, int(isl), eff, act_bytes), st

    if prefill is not None:
        x, p_lay = prefill
        t_p, per_inst = _prefill_capacity(mc, prof, hw, p_lay, int(isl), eff, act_bytes)
        t_one = prefill_time(mc, prof, hw, p_lay, int(isl), eff, act_bytes=act_bytes, batch=1)[0]
        mu = x * per_inst
        kv_move = isl * mc.kv_bytes_per_token() / (hw.scaleout_gbs * 1e9 * eff.scaleout)
        gpus = x * p_lay.gpus + y * d_lay.gpus
    else:
        mu, gpus = math.inf, y * d_lay.gpus

    def rows_at(lam: float) -> float | None:
        """Rows per rank where decode's Little's law closes at request rate `lam` (None: decode cannot keep up)."""
        r = 1.0
        for _ in range(200):
            s, _ = step(r)
            nxt = lam * osl * s / tps / ranks
            if nxt > 1e6:
                return None
            if abs(nxt - r) < 1e-6 * max(1.0, r):
                return nxt
            r = nxt
        return r

    def ttft(lam: float, r: float) -> float:
        s, _ = step(r)
        if prefill is None:   # the prompt rides in the next step as one chunk on its rank's GPUs
            return s + _agg_prefill_seconds(mc, prof, hw, d_lay.gpus, isl / d_lay.tp, int(isl), eff, act_bytes)
        u = lam / mu   # a prompt alone when the pool is idle; queueing behind full batches as it fills
        return t_one + u / (2 * (1 - u)) * t_p + kv_move + s

    def clients(lam: float) -> float:
        if lam >= mu:
            return math.inf
        r = rows_at(lam)
        if r is None:
            return math.inf
        return lam * (ttft(lam, r) + osl * step(r)[0] / tps)

    # clients(λ) grows with λ (to infinity at the prefill capacity): bisect for clients(λ) = C
    if math.isfinite(mu):
        lo, hi = 0.0, mu
    else:
        lo, hi = 0.0, 1.0
        while clients(hi) < concurrency:
            lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if clients(mid) < concurrency:
            lo = mid
        else:
            hi = mid
    lam = lo
    r = rows_at(lam) or 0.0
    s, st = step(r)
    tpot = s / tps
    # the closed loop sets the rate; near the prefill capacity the prompts queue instead
    bound = "prefill" if lam >= 0.95 * mu else "clients"
    fits = kv_fits(mc, hw, d_lay, max(1, math.ceil(r)), wl.isl + wl.osl, eff, mtp)
    return Prediction(concurrency, lam, lam * osl, lam * osl / gpus, 1 / tpot, ttft(lam, r), tpot, r,
                      0.0 if prefill is None else lam / mu, gpus, eff.ep_imbalance, st.parts(), fits, bound)


def _args(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m planner predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-r1")
    ap.add_argument("--hardware", default="b200", help=f"one of {sorted(HARDWARE)}")
    ap.add_argument("--prefill", default="1:tp8", help="COUNT:LAYOUT of the prefill pool (0: aggregated)")
    ap.add_argument("--decode", default="1:ep8", help="COUNT:LAYOUT of the decode pool")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64], help="concurrent clients (one or more)")
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=1024)
    ap.add_argument("--quant", default="nvfp4", choices=["bf16", "fp8", "nvfp4", "mxfp4"])
    ap.add_argument("--mtp", action="store_true", help="MTP speculative decoding (k = 1)")
    ap.add_argument("--mtp_acceptance", type=float, default=0.75)
    ap.add_argument("--cache_dtype", default="fp8", choices=["bfloat16", "fp8"])
    ap.add_argument("--act_bytes", type=float, default=2.0)
    ap.add_argument("--weight_only", action="store_true", help="matmuls at the bf16 rate (W8A16/W4A16 kernels)")
    ap.add_argument("--expert_load", default="", help="routing counts [layers][experts] (JSON or .npy)")
    ap.add_argument("--zipf", type=float, default=None, help="Zipf-like expert popularity instead of counts")
    ap.add_argument("--redundant_experts", type=int, default=0, help="EPLB slots (with --expert_load / --zipf)")
    ap.add_argument("--eff", action="append", default=[], help="Efficiency field override, e.g. hbm=0.7")
    ap.add_argument("--profile", default="", help="step profile JSON (default assets/planner/<model>.json)")
    ap.add_argument("--json_out", default="runs/predict.json")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    from planner.cli import efficiency, load_profile, model_config, profile_name
    from planner.hardware import model_costs

    a = _args(argv)
    if a.hardware not in HARDWARE:
        raise SystemExit(f"unknown hardware {a.hardware!r}; known: {sorted(HARDWARE)}")
    hw = HARDWARE[a.hardware]
    cfg = model_config(a.model)
    try:
        prefill, decode = parse_pool(a.prefill, "prefill"), parse_pool(a.decode, "decode")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    eff = efficiency(a.eff)
    d_lay = decode[1]
    source = "Efficiency.ep_imbalance (a-priori)"
    if a.expert_load or a.zipf is not None:
        load = (read_load(a.expert_load) if a.expert_load else
                zipf_load(cfg.n_routed_experts, a.zipf, cfg.num_hidden_layers - cfg.first_k_dense_replace))
        if load.shape[1] != cfg.n_routed_experts:
            raise SystemExit(f"--expert_load has {load.shape[1]} experts; {a.model} has {cfg.n_routed_experts}")
        domains = max(1, d_lay.gpus // hw.domain)
        try:
            imb = ep_imbalance(load, d_lay.gpus, redundant=a.redundant_experts, domains=domains, groups=cfg.n_group)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        eff = eff.replace(ep_imbalance=imb)
        source = (f"{'Zipf ' + str(a.zipf) if a.zipf is not None else a.expert_load}, "
                  f"{'EPLB +' + str(a.redundant_experts) + ' slots' if a.redundant_experts else 'one copy per expert'}")
    elif a.redundant_experts:
        raise SystemExit("--redundant_experts needs routing counts: --expert_load FILE or --zipf S")
    prof = load_profile(cfg, profile_name(cfg), a.profile or None)
    mc = model_costs(cfg, a.quant, a.cache_dtype, a.model)
    if a.redundant_experts:   # each GPU holds its share of the extra slots
        mc = dataclasses.replace(mc, experts=mc.experts + a.redundant_experts)
    if a.weight_only:
        mc = dataclasses.replace(mc, expert_format="bf16", linear_format="bf16")
    wl = Workload(a.isl, a.osl, mtp=a.mtp, mtp_acceptance=a.mtp_acceptance)
    pool = "aggregated" if prefill is None else f"{prefill[0]} x {prefill[1]} prefill"
    print(f"{a.model} {a.quant} on {hw.system}: {pool} + {decode[0]} x {decode[1]} decode; ISL/OSL {a.isl}/{a.osl}; "
          f"MTP {'on' if a.mtp else 'off'}; EP imbalance {eff.ep_imbalance:.3f} ({source})")
    print("| concurrency | req/s | tok/s | tok/s/GPU | tok/s/user | TTFT s | TPOT ms | rows/rank | prefill util | "
          "KV fits | decode step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for c in a.concurrency:
        p = predict(mc, prof, hw, wl, eff, prefill=prefill, decode=decode, concurrency=c, act_bytes=a.act_bytes)
        out.append(dataclasses.asdict(p))
        print(f"| {c} | {p.request_rate:.2f} | {p.tok_s:,.0f} | {p.tok_s_gpu:,.0f} | {p.tok_s_user:.1f} | "
              f"{p.ttft_s:.3f} | {p.tpot_s * 1e3:.2f} | {p.rows_per_rank:.1f} | {p.prefill_util:.2f} | "
              f"{'yes' if p.kv_fits else 'NO'} | {p.decode_step} |")
    if a.json_out:
        os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump({"model": a.model, "hardware": a.hardware, "prefill": a.prefill, "decode": a.decode,
                       "isl": a.isl, "osl": a.osl, "quant": a.quant, "mtp": a.mtp, "ep_imbalance_source": source,
                       "predictions": out}, f, indent=1)
        print(f"wrote {a.json_out}")
    return out
