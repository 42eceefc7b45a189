"""The planner: its arithmetic on hand-computed cases, and a plan built from executables compiled on fake devices."""

import json
import math

import pytest

from model.config import preset
import planner
import planner.cluster
import planner.step
from sharding.hlo import collectives, kernel_count, wire_factor
from planner import (HARDWARE, DecodeLayout, Efficiency, Hardware, PrefillLayout, StepProfile, Workload)

HW = Hardware("toy", 100e9, 1000.0, 1e15, 2e15, None, 8, 500.0, 50.0, 3.6, "toy")


def test_wire_factors_and_hlo_parsing():
    assert wire_factor("all-to-all", 8) == pytest.approx(7 / 8)
    assert wire_factor("all-reduce", 4) == pytest.approx(1.5)
    assert wire_factor("reduce-scatter", 4) == 3.0
    assert wire_factor("all-gather", 1) == 0.0
    hlo = """HloModule m
ENTRY %main (p: bf16[4,64]) -> bf16[4,64] {
  %p = bf16[4,64]{1,0} parameter(0)
  %a2a = bf16[4,64]{1,0} all-to-all(%p), replica_groups=[2,4]<=[8], dimensions={0}, metadata={op_name="jit(f)/layer1/x"}
  %ar = (f32[16]{0}, s32[2]{0}) all-reduce(%p), replica_groups={{0,1},{2,3}}, to_apply=%add
  %f = bf16[4,64]{1,0} fusion(%a2a), kind=kLoop, calls=%fused_computation
  ROOT %t = (bf16[4,64]{1,0}) tuple(%f)
}
"""
    cs = collectives(hlo, 8)
    assert [(c["op"], c["bytes"], c["group"]) for c in cs] == [("all-to-all", 512, 4), ("all-reduce", 72, 2)]
    assert cs[0]["wire"] == pytest.approx(512 * 3 / 4)
    assert (cs[1]["float_bytes"], cs[1]["other_bytes"]) == (64, 8)
    assert kernel_count(hlo) == 3   # the two collectives and the fusion; parameter and tuple launch nothing


def test_comm_seconds_in_and_across_domains():
    eff = Efficiency(nvlink=0.5, scaleout=0.5)
    t, cross = planner.step._comm_seconds(HW, eff, 1e9, 8)
    assert not cross and t == pytest.approx(1e9 / 250e9)
    t, cross = planner.step._comm_seconds(HW, eff, 1e9, 16)   # 8 of the 15 peers are off-domain
    assert cross and t == pytest.approx(max(1e9 * 8 / 15 / 25e9, 1e9 * 7 / 15 / 250e9))
    assert planner.step._comm_seconds(HW, eff, 1e9, 1) == (0.0, False)


def test_executable_step_roofline_and_serial():
    eff = Efficiency(hbm=0.5, kernel_overhead=1e-6, step_overhead=1e-4)
    st = planner.executable_step(HW, eff, flops=1e12, hbm_bytes=1e9, kernels=100)   # 1 ms compute, 2 ms HBM
    assert st.seconds == pytest.approx(2e-3 + 1e-4 + 1e-4)
    st = planner.executable_step(HW, eff, flops=1e12, hbm_bytes=1e9, kernels=100, serial=True)
    assert st.seconds == pytest.approx(3e-3 + 2e-4)


def test_usd_per_mtok_pareto_and_interactivity():
    assert planner.cluster._usd(HW, 1000.0) == pytest.approx(3.6 / 3.6)      # $3.6/h at 1000 tok/s = 3.6 Mtok/h
    mk = lambda u, g: planner.Point("toy", "disagg", "d", "p", 0, 8, 1, False, 1 / u, 0.1, u, g, 0, "")
    pts = [mk(10, 100), mk(20, 80), mk(15, 50), mk(30, 20), mk(25, 10)]
    assert [(p.tok_s_user, p.tok_s_gpu) for p in planner.pareto(pts)] == [(10, 100), (20, 80), (30, 20)]
    assert planner.at_interactivity(pts, 16).tok_s_gpu == 80
    assert planner.at_interactivity(pts, 31) is None


@pytest.fixture(scope="module")
def tiny_profile():
    """Collectives of the tiny model's engine executables compiled on fake devices: decode at ep=4 (1 and 2 rows
    per device), prefill at tp=2, a check at ep=2."""
    return planner.build_profile(preset("tiny"), "tiny", decode_ep=4, rows=(1, 2), prefill_tp=2, prefill_tokens=16,
                                 check_ep=2, capacity_factor=2.0)


def test_profile_bytes_match_the_dispatch_by_hand(tiny_profile):
    cfg = preset("tiny")
    D, k, ep = cfg.hidden_size, cfg.num_experts_per_tok, 4
    # capacity per destination = ceil(2.0 x n x k / ep) = n rows for n local rows; dispatch + combine carry
    # [ep, C, D] f32 each way, the expert ids [ep, C] s32 once: per row 2 x ep x D x 4 float, ep x 4 int bytes
    a2a = tiny_profile.decode["moe"]["all-to-all"]
    assert a2a[0] == pytest.approx(2 * ep * D * 4 * math.ceil(2.0 * k / ep))
    assert a2a[1] == pytest.approx(ep * 4 * math.ceil(2.0 * k / ep))
    # prefill TP: the MoE and dense layers all-reduce a D-wide f32 row per token (attention out + FFN)
    assert tiny_profile.prefill["dense"]["all-reduce"][0] == pytest.approx(2 * D * 4)
    # prefill EP8 of 16 tokens: 2 per device, capacity min(ceil(2.0 x 2 x k / 8), 2 x min(k, E / 8)) = 1 per
    # destination; per token a device holds: dispatch + combine of [8, 1, D] f32, halved
    C = min(math.ceil(2.0 * 2 * k / 8), 2 * min(k, cfg.n_routed_experts // 8))
    assert tiny_profile.prefill_ep_bytes["moe"]["all-to-all"][0] == pytest.approx(2 * 8 * C * D * 4 / 2)
    assert abs(tiny_profile.check["error"]) < 0.1
    back = StepProfile.from_json(json.loads(json.dumps(tiny_profile.to_json())))
    assert back.decode == tiny_profile.decode


def test_plan_a_small_layout_from_compiled_executables(tiny_profile):
    cfg = preset("tiny")
    mc = planner.model_costs(cfg, "bf16", "bfloat16", "tiny")
    # the per-part bytes add up to the model's parameters (bf16)
    assert mc.total_weight_bytes == pytest.approx(2 * cfg.num_params(), rel=0.02)
    eff = Efficiency()
    s1 = planner.decode_step(mc, tiny_profile, HW, DecodeLayout(4), 1, 64, eff)
    s8 = planner.decode_step(mc, tiny_profile, HW, DecodeLayout(4), 8, 64, eff)
    assert s8.comm_bytes == pytest.approx(8 * s1.comm_bytes) and s8.flops > 7 * s1.flops
    # the same wire bytes scaled from the profile by hand: moe layers x (a2a + other ops), at bf16 activations
    moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    by_hand = sum(moe * wire_factor(op, 4) * (fb * 2 / 4 + ob) for op, (fb, ob) in tiny_profile.decode["moe"].items())
    by_hand += sum(wire_factor(op, 4) * (fb * 2 / 4 + ob) for op, (fb, ob) in
                   tiny_profile.decode.get("other", {}).items())
    by_hand += sum(cfg.first_k_dense_replace * wire_factor(op, 4) * (fb * 2 / 4 + ob) for op, (fb, ob) in
                   tiny_profile.decode.get("dense", {}).items())
    assert s1.comm_bytes == pytest.approx(by_hand)
    wl = Workload(isl=128, osl=64, mtp=True, mtp_acceptance=0.5)
    pts = planner.simulate(mc, tiny_profile, HW, wl, eff, decode_sizes=(1, 4, 8))
    assert {p.mode for p in pts} == {"disagg", "agg"}
    front = planner.pareto([p for p in pts if p.mode == "disagg"])
    assert front and all(a.tok_s_user <= b.tok_s_user and a.tok_s_gpu >= b.tok_s_gpu for a, b in zip(front, front[1:]))
    for p in pts:   # tok/s/GPU = decode rows x tokens per step / step, shared with the prefill GPUs
        assert p.tok_s_gpu <= p.rows_per_rank * p.tok_s_user + 1e-6
        assert p.usd_per_mtok == pytest.approx(HW.usd_per_gpu_hour / (3600 * p.tok_s_gpu / 1e6))
    s = planner.size_for_slo(mc, tiny_profile, HW, wl, eff, rate=100.0, ttft_slo=0.5, tpot_slo=0.005)
    assert s["tpot_s"] <= 0.005 and s["ttft_s"] <= 0.5 and s["total_gpus"] == s["prefill_gpus"] + s["decode_gpus"]
    with pytest.raises(ValueError, match="TPOT"):
        planner.size_for_slo(mc, tiny_profile, HW, wl, eff, rate=1.0, ttft_slo=1.0, tpot_slo=1e-9)


def test_dwdp_prefill_and_domain_limit(tiny_profile):
    mc = planner.model_costs(preset("deepseek-v3"), "nvfp4", "fp8", "v3")
    prof = planner.load_profile(None, "deepseek-v3")          # the shipped real-dims profile
    hw, eff = HARDWARE["b200"], Efficiency()
    t, rate = planner.prefill_time(mc, prof, hw, PrefillLayout(4, "dwdp"), 1024, eff, batch=4 * 16)
    fetch = mc.total_weight_bytes * 3 / 4 / (hw.nvlink_gbs * 1e9 * eff.nvlink)
    assert t >= fetch and rate == pytest.approx(4 * 16 * 1024 / t / 4)
    with pytest.raises(ValueError, match="domain"):
        planner.prefill_time(mc, prof, hw, PrefillLayout(16, "dwdp"), 1024, eff)
    # V3 FP4 at real dims: ~0.4 TB of weights; DEP72 on GB200 holds 1/72 of the experts per GPU
    assert 3.5e11 < mc.total_weight_bytes < 4.5e11
    assert planner.kv_fits(mc, HARDWARE["gb200"], DecodeLayout(72), 64, 2048, eff, True)
    assert not planner.kv_fits(mc, HARDWARE["h100"], DecodeLayout(1), 1, 2048, eff, False)


def test_cli_prints_the_pareto_table_and_writes_json_png(tmp_path, capsys):
    res = planner.main(["--hardware=b200,gb200", f"--json_out={tmp_path}/p.json", f"--png_out={tmp_path}/p.png",
                        "--rate=20", "--dwdp"])
    out = capsys.readouterr().out
    assert "| mode | tok/s/user | tok/s/GPU |" in out and "GB200 NVL72" in out and "SLO sizing" in out
    assert (tmp_path / "p.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "p.json").read_text())
    assert set(saved["hardware"]) == {"b200", "gb200"} and saved["published"]["b200_pub"] == 941.0
    assert res["hardware"]["gb200"]["at_125"]["best"] > res["hardware"]["b200"]["at_125"]["best"]


def test_fit_published_finds_a_value_within_three_percent():
    cfg = preset("deepseek-r1")
    mc = planner.model_costs(cfg, "nvfp4", "fp8", "r1")
    prof = planner.load_profile(None, planner.profile_name(cfg))
    wl = Workload(1024, 1024, mtp=True, mtp_acceptance=0.75)
    [r] = planner.fit_published(mc, prof, wl, Efficiency(kernel_overhead=1.5e-6), fields=("kernel_overhead",))
    lo, hi = planner.FIT_RANGES["kernel_overhead"]
    assert r["value"] is not None and lo <= r["value"] <= hi, r
    assert abs(r["fit"] / planner.PUBLISHED["b200"] - 1) < 0.03
    assert r["check_err"] == pytest.approx(r["check"] / planner.PUBLISHED["gb200"] - 1)
    # the fitted value's own run reproduces it: B200 at the published interactivity
    e = Efficiency(kernel_overhead=r["value"])
    pts = planner.simulate(mc, prof, HARDWARE["b200"], wl, e)
    p = planner.at_interactivity(pts, planner.PUBLISHED["interactivity"])
    assert p.tok_s_gpu == pytest.approx(r["fit"])


def test_cpu_validation_runs_the_step_function_of_the_gpu_predictions(monkeypatch):
    """`bench.planner_cpu` predicts each CPU executable with `planner.decode_step` / `planner.prefill_time` — the
    functions behind every GPU figure — not a separate CPU-only formula."""
    from bench import planner_cpu

    cal = dict(matmul_flops=50e9, stream_bytes_s=10e9, hbm_eff=0.5, compute_decode=0.3, compute_prefill=0.5,
               kernel_s=2e-6, call_s=50e-6)
    monkeypatch.setattr(planner_cpu, "calibrate", lambda reps: cal)   # the probes' timing is not under test
    calls = {"decode": [], "prefill": []}
    real_d, real_p = planner.decode_step, planner.prefill_time
    monkeypatch.setattr(planner, "decode_step", lambda *a, **k: calls["decode"].append(real_d(*a, **k))
                        or calls["decode"][-1])
    monkeypatch.setattr(planner, "prefill_time", lambda *a, **k: calls["prefill"].append(real_p(*a, **k))
                        or calls["prefill"][-1])
    res = planner_cpu.run(2, configs={"tiny": preset("tiny").replace(num_nextn_predict_layers=0)}, batches=(1, 2),
                          chunks=(16,))
    dec = [r for r in res["rows"] if r["exe"].startswith("decode")]
    pre = [r for r in res["rows"] if r["exe"].startswith("prefill")]
    assert [r["predicted_s"] for r in dec] == [st.seconds for st in calls["decode"]]
    assert [r["predicted_s"] for r in pre] == [t + cal["call_s"] for t, _ in calls["prefill"]]
    assert all(r["measured_s"] > 0 for r in res["rows"])


def _r1():
    cfg = preset("deepseek-r1")
    return cfg, planner.model_costs(cfg, "nvfp4", "fp8", "r1"), planner.load_profile(None, planner.profile_name(cfg))


def test_predict_a_given_deployment_closes_littles_law_and_saturates_prefill():
    from planner.predict import parse_pool, predict

    cfg, mc, prof = _r1()
    hw, wl, eff = HARDWARE["b200"], Workload(1024, 1024, mtp=True), Efficiency()
    pools = dict(prefill=parse_pool("4:tp4", "prefill"), decode=parse_pool("40:ep8", "decode"))
    assert pools["prefill"][1] == PrefillLayout(4, "tp") and pools["decode"] == (40, DecodeLayout(8))
    preds = [predict(mc, prof, hw, wl, eff, concurrency=c, **pools) for c in (64, 512, 4096)]
    for p in preds:   # the closed loop: C = λ (TTFT + OSL TPOT), and the decode rows are λ OSL TPOT
        assert p.concurrency == pytest.approx(p.request_rate * (p.ttft_s + wl.mean_osl * p.tpot_s), rel=1e-3)
        assert p.rows_per_rank * 40 * 8 == pytest.approx(p.request_rate * wl.mean_osl * p.tpot_s, rel=1e-3)
        assert p.gpus == 4 * 4 + 40 * 8 and p.tok_s_gpu == pytest.approx(p.tok_s / p.gpus)
    assert preds[0].tok_s < preds[1].tok_s < preds[2].tok_s and preds[0].tpot_s < preds[2].tpot_s
    # one small prefill instance for a large decode pool: the prompts queue, the rate stops at its capacity
    one = predict(mc, prof, hw, wl, eff, prefill=parse_pool("1:tp4", "prefill"), decode=pools["decode"],
                  concurrency=20000)
    assert one.bound == "prefill" and one.prefill_util > 0.95 and one.ttft_s > 10 * preds[0].ttft_s
    agg = predict(mc, prof, hw, wl, eff, prefill=None, decode=(1, DecodeLayout(8)), concurrency=64)
    assert agg.gpus == 8 and agg.prefill_util == 0 and agg.ttft_s > 0
    for bad, kind in (("4tp4", "prefill"), ("0:tp4", "prefill"), ("2:xp8", "decode"), ("1:tq4", "prefill")):
        with pytest.raises(ValueError, match=f"--{kind}"):
            parse_pool(bad, kind)


def test_predict_prices_measured_ep_imbalance_and_eplb(tmp_path, capsys):
    from planner.predict import ep_imbalance, main, zipf_load

    cfg, mc, prof = _r1()
    load = zipf_load(256, 1.0, layers=4)
    flat = ep_imbalance(load, 32)
    balanced = ep_imbalance(load, 32, redundant=32, domains=1, groups=8)
    assert flat > 3.0 and balanced < 1.1 and ep_imbalance(load, 1) == 1.0
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"counts": load.tolist()}))
    common = ["--hardware=gb200", "--prefill=2:ep8", "--decode=1:ep32", "--concurrency", "2048", "--mtp",
              f"--expert_load={path}"]
    skew = main(common + [f"--json_out={tmp_path}/a.json"])[0]
    eplb = main(common + ["--redundant_experts=32", f"--json_out={tmp_path}/b.json"])[0]
    assert skew["ep_imbalance"] == pytest.approx(flat) and eplb["ep_imbalance"] == pytest.approx(balanced, rel=0.05)
    assert eplb["tok_s_gpu"] > 1.2 * skew["tok_s_gpu"] and eplb["tpot_s"] < skew["tpot_s"]
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["predictions"][0]["concurrency"] == 2048 and "EPLB +32" in saved["ep_imbalance_source"]
    assert "| concurrency | req/s |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs routing counts"):
        main(["--redundant_experts=32", "--json_out="])
    (tmp_path / "bad.json").write_text("{\"counts\": [1, 2]}")
    with pytest.raises(ValueError, match="bad.json"):
        main(common[:-1] + [f"--expert_load={tmp_path}/bad.json", "--json_out="])
