"""Planner and cluster simulator: predicted tok/s/GPU vs tok/s/user of xPyD layouts on H100/H200/B200/GB200 NVL72.

    python -m planner                                   # DeepSeek-R1 FP4, 1k/1k, HGX-B200 vs GB200 NVL72
    python -m planner --hardware=h200 --quant=fp8 --isl=4096 --osl=1024 --rate=20 --ttft_slo=2 --tpot_slo=0.05

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
import os
import sys
import time
from typing import Any

from planner.hardware import HARDWARE, Efficiency, model_costs
from planner.profile import StepProfile, build_profile
from planner.cluster import Workload, at_interactivity, best_prefill, pareto, simulate, size_for_slo

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


def model_config(name: str):
    """--model: a preset name or an HF checkpoint directory (a clear exit otherwise)."""
    from model.config import ModelConfig, preset, presets

    if name in presets():
        return preset(name)
    if os.path.exists(os.path.join(name, "config.json")):
        return ModelConfig.from_hf(name)
    raise SystemExit(f"--model {name!r}: not a preset ({', '.join(presets())}) nor an HF checkpoint directory")


def efficiency(overrides: list[str]) -> Efficiency:
    """`Efficiency` with the --eff name=value overrides (a clear exit on an unknown name)."""
    fields = {f.name: f.type for f in dataclasses.fields(Efficiency)}
    kw = {}
    for e in overrides:
        k, _, v = e.partition("=")
        if k not in fields or not v:
            raise SystemExit(f"--eff {e!r}: expected name=value with name one of {sorted(fields)}")
        kw[k] = int(v) if fields[k] in ("int", int) else float(v)
    return Efficiency().replace(**kw)


def _args(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m planner", description=__doc__.split("\n\n")[0])
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
    t0 = time.perf_counter()
    cfg, eff = model_config(a.model), efficiency(a.eff)
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
    try:
        import matplotlib
    except ImportError:   # an optional dependency (the `bench` extra): the table and JSON are the result
        print(f"no plot written to {path}: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return

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
