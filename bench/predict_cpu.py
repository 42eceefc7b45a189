"""`planner predict` against a deployment measured on this CPU: nothing fitted to the measurement.

    python -m bench.predict_cpu [--isl 128 --osl 96 --concurrency 1,4,16 --prompts_per_concurrency 4]

The machine is probed first with generic kernels (`bench.planner_cpu.calibrate`: matmul peak, streaming bandwidth,
fixed cost per kernel and per call — no model); the kernels per layer are counted in the shipped model's decode
executable. With those as `Hardware` / `Efficiency` (serial=True: XLA:CPU runs one op at a time, the one CPU switch),
`planner.predict` predicts the aggregated deployment `python -m serving.server` runs on the shipped model (one
device, `--max_batch=16`) for closed-loop clients at each concurrency. Then that server is started and measured
with `bench.sweep`'s InferenceX protocol (random prompts in [0.8 ISL, ISL], exactly OSL tokens, the same
concurrency points). Printed and written (`--json`): predicted vs measured output tok/s, mean TTFT and mean TPOT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from bench import planner_cpu   # (its flags: --reps, calibration repeats)

FLAGS = flags.FLAGS
flags.DEFINE_integer("isl", 128, "input length L (prompts uniform in [0.8L, L])")
flags.DEFINE_integer("osl", 96, "output tokens per request (ISL + OSL <= the shipped model's 256 positions)")
flags.DEFINE_list("concurrency", ["1", "4", "16"], "closed-loop clients")
flags.DEFINE_integer("prompts_per_concurrency", 4, "requests per point = this x concurrency")
flags.DEFINE_string("out", "runs/predict_cpu.json", "results")


def predicted(concurrency: list[int]) -> tuple[list[dict], dict]:
    import dataclasses

    import jax.numpy as jnp

    import checkpoints
    from planner import DecodeLayout, Efficiency, Hardware, Workload, model_costs
    from planner.predict import predict
    from serving.config import DEFAULT_CHECKPOINT, EngineConfig
    from serving.engine import Engine
    from sharding.hlo import kernel_count

    m = checkpoints.load(DEFAULT_CHECKPOINT, dtype=jnp.float32)
    mcfg = m.cfg
    Z, L = 16, 512
    eng = Engine(m, EngineConfig(page_size=Z, num_pages=16 * (L // Z) + 2, max_model_len=L, prefill_buckets=(64,),
                                 prefill_rows=(1,), decode_buckets=(16,), decode_steps=1, decode_windows=(L // Z,)),
                 roles={"prefill", "decode"})
    kernels = kernel_count(eng.executables()["decode", 16, L // Z].as_text())
    cal = planner_cpu.calibrate(FLAGS.reps)
    hw = Hardware("cpu", 24e9, cal["stream_bytes_s"] / 1e9, cal["matmul_flops"], cal["matmul_flops"], None, 1, 1.0,
                  1.0, 0.0, "this CPU (calibrated)")
    eff = Efficiency(hbm=cal["hbm_eff"], compute_decode=cal["compute_decode"], compute_prefill=cal["compute_prefill"],
                     kernel_overhead=cal["kernel_s"], step_overhead=cal["call_s"],
                     kernels_per_layer=max(1, round(kernels / mcfg.num_hidden_layers)), ep_imbalance=1.0, serial=True)
    mc = model_costs(mcfg, "f32", "float32", "shipped")
    wl = Workload(FLAGS.isl, FLAGS.osl, isl_spread=0.2, mtp=False)
    out = [dataclasses.asdict(predict(mc, planner_cpu._profile(), hw, wl, eff, prefill=None, decode=(1, DecodeLayout(1)),
                                      concurrency=c, act_bytes=4.0)) for c in concurrency]
    return out, cal


def main(argv):
    del argv
    conc = [int(c) for c in FLAGS.concurrency]
    preds, cal = predicted(conc)
    with tempfile.TemporaryDirectory() as d:   # the measurement: bench.sweep starts the server and stops it
        path = os.path.join(d, "sweep.json")
        subprocess.run([sys.executable, "-m", "bench.sweep", "--launch=colocated", f"--isl={FLAGS.isl}",
                        f"--osl={FLAGS.osl}", f"--concurrency={','.join(map(str, conc))}",
                        f"--prompts_per_concurrency={FLAGS.prompts_per_concurrency}", f"--json={path}",
                        f"--png={os.path.join(d, 'sweep.png')}"], check=True, timeout=3000)
        with open(path) as f:
            meas = json.load(f)["targets"]["colocated"]["points"]
    rows = []
    print("| concurrency | tok/s predicted | measured | error | TTFT ms pred. | meas. (mean) | TPOT ms pred. | "
          "meas. (mean) | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pr, me in zip(preds, meas):
        row = {"concurrency": pr["concurrency"], "tok_s_pred": pr["tok_s"], "tok_s_meas": me["output_tok_s"],
               "ttft_ms_pred": pr["ttft_s"] * 1e3, "ttft_ms_meas": me["ttft_ms"]["mean"],
               "tpot_ms_pred": pr["tpot_s"] * 1e3, "tpot_ms_meas": me["tpot_ms"]["mean"]}
        rows.append(row)
        print(f"| {row['concurrency']} | {row['tok_s_pred']:.1f} | {row['tok_s_meas']:.1f} | "
              f"{row['tok_s_pred'] / row['tok_s_meas'] - 1:+.0%} | {row['ttft_ms_pred']:.1f} | "
              f"{row['ttft_ms_meas']:.1f} | {row['tpot_ms_pred']:.2f} | {row['tpot_ms_meas']:.2f} | "
              f"{row['tpot_ms_pred'] / row['tpot_ms_meas'] - 1:+.0%} |", flush=True)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"calibration": cal, "rows": rows, "predictions": preds, "measured": meas}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
