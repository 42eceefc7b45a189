"""Validation of the planner's step model on this CPU: predicted vs measured decode and prefill steps.

    python -m bench.planner_cpu            # shipped model + a larger random config, batch 1/4/16, prefill 32/128

The machine is calibrated first, with generic probes and nothing of the model (`calibrate`): the f32 matmul peak
(1024^3), the weight-streaming bandwidth (a matvec over a 256 MiB matrix), what XLA:CPU reaches on [M, 512] x
[512, 512] dot chains (M=1: `hbm` efficiency, M=16: `compute_decode`, M=128: `compute_prefill`), the fixed cost
per kernel (a chain of tiny links) and per executable call (a 300-leaf argument list). Then, for each engine
executable (1-step decode at a batch, prefill at a chunk), the *same step functions the GPU predictions use*
(`planner.decode_step`, `planner.prefill_time`) predict its time on this CPU as `Hardware`, from the model's costs
(`planner.model_costs` of the config in f32: weight bytes from the abstract model, FLOPs from the engine's analytic
count), a 1-device layout (no collectives), kernels per layer counted in the executable's HLO and
`Efficiency(serial=True)` (compute and memory time add up: XLA:CPU runs one op at a time). The engine's routed
experts run the `segment` path (only live experts' rows, as a GPU's grouped GEMM). Each executable is timed
(median of 15 calls, after a warm-up call).
"""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.timing import dot_chain_seconds, median_time as _median_time

from bench.decode_grid import matmul_peak, stream_bandwidth   # (defines its flags; none collide)

flags.DEFINE_string("json_out", None, "write the results here too")
flags.DEFINE_integer("reps", 15, "timed calls per executable")
FLAGS = flags.FLAGS



def _chain_time(D: int, M: int, links: int, reps: int) -> float:
    """Seconds per link of a [M, D] x [D, D] dot chain (`bench.timing.dot_chain_seconds`), median of reps."""
    return dot_chain_seconds(M, D, links, reps)


def calibrate(reps: int = 15) -> dict:
    """The machine, probed with generic kernels (no model): the f32 matmul peak (1024^3) and weight-streaming
    bandwidth (matvec over 256 MiB); then what XLA:CPU reaches on model-sized ops, as the planner's efficiency
    fields: a chain of [M, 512] x [512, 512] dots — M=1 (matvec: the decode weight stream, `hbm`), M=16 (decode
    `compute_decode`), M=128 (prefill `compute_prefill`) — and a chain of tiny [1, 64] x [64, 64] links for the
    fixed cost per kernel (a dot and an elementwise fusion per link); the cost of calling an executable with a
    model-sized (300-leaf) argument list."""
    from sharding.hlo import kernel_count

    peak, bw = matmul_peak(), stream_bandwidth()
    D, links = 512, 40
    t1, t16, t128 = (_chain_time(D, M, links, reps) for M in (1, 16, 128))
    t_tiny = _chain_time(64, 1, 200, reps)
    w = jnp.ones((64, 64), jnp.float32)
    per_link = kernel_count(jax.jit(lambda x: jnp.tanh(jnp.tanh(x @ w) @ w)).lower(jnp.ones((1, 64))).compile()
                            .as_text()) / 2
    args = [jnp.ones((64,), jnp.float32) + i for i in range(300)]
    g = jax.jit(lambda xs: xs[0][0] + xs[-1][0])
    per_call = _median_time(lambda: g(args).block_until_ready(), reps)
    return dict(matmul_flops=peak, stream_bytes_s=bw, kernel_s=t_tiny / max(per_link, 1), call_s=per_call,
                hbm_eff=(D * D * 4 / t1) / bw, compute_decode=(2 * 16 * D * D / t16) / peak,
                compute_prefill=(2 * 128 * D * D / t128) / peak, kernels_per_link=per_link)


def _configs():
    from model.config import ModelConfig

    base = dict(vocab_size=4096, n_group=1, topk_group=1, qk_rope_head_dim=16, first_k_dense_replace=1,
                max_position_embeddings=512, num_nextn_predict_layers=0, rope_scaling=None)
    return {
        "shipped": None,
        "random D512 E32 k4 L6": ModelConfig(**base, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                                             num_hidden_layers=6, num_attention_heads=8, n_shared_experts=1,
                                             n_routed_experts=32, num_experts_per_tok=4, kv_lora_rank=128,
                                             q_lora_rank=192, v_head_dim=32, qk_nope_head_dim=32),
    }


def _model(name, cfg):
    from flax import nnx

    import checkpoints
    import model as model_lib
    from serving.config import DEFAULT_CHECKPOINT

    if cfg is None:
        return checkpoints.load(DEFAULT_CHECKPOINT, dtype=jnp.float32)
    return model_lib.DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)


def _profile():
    from planner import StepProfile

    return StepProfile(model="cpu", decode_ep=1, decode_rows=[1], decode={}, prefill_tp=1, prefill_tokens=1,
                       prefill={}, capacity_factor=1.0, prefill_ep=1, prefill_ep_bytes={"other": {}})


def run(reps: int, configs=None, batches=(1, 4, 16), chunks=(32, 128)) -> dict:
    """Predict each executable with the GPU planner's own step functions (`planner.decode_step` on a 1-device
    `DecodeLayout`, `planner.prefill_time` on a 1-device TP layout) on this CPU as `Hardware`, then time it."""
    from planner import DecodeLayout, Efficiency, Hardware, PrefillLayout, decode_step, model_costs, prefill_time
    from serving.config import EngineConfig
    from serving.engine import Engine
    from sharding.hlo import kernel_count

    rows = []
    prof = _profile()
    for name, cfg in (configs or _configs()).items():
        m = _model(name, cfg)
        # the routed experts as the GPU model prices them: only the live experts' rows (grouped GEMM); XLA:CPU's
        # other paths (dense over all experts, gathered copies) are not what a GPU runs
        m.runtime = m.runtime.replace(moe_impl="segment")
        mcfg = m.cfg
        Z, L = 16, 256
        ec = EngineConfig(page_size=Z, num_pages=max(batches) * (L // Z) + 2, max_model_len=L,
                          prefill_buckets=tuple(chunks), decode_buckets=tuple(batches), decode_steps=1,
                          decode_windows=(L // Z,), prefill_rows=(1,))
        eng = Engine(m, ec)
        mc = model_costs(mcfg, "f32", "float32", name)
        # calibrated right before this model's timings: this shared machine drifts by tens of % within minutes
        cal = calibrate(reps)
        hw = Hardware("cpu", 24e9, cal["stream_bytes_s"] / 1e9, cal["matmul_flops"], cal["matmul_flops"], None, 1,
                      1.0, 1.0, 0.0, "this CPU (calibrated)")
        layers = mcfg.num_hidden_layers
        print(f"calibration: matmul {cal['matmul_flops'] / 1e9:.1f} GFLOP/s, streaming "
              f"{cal['stream_bytes_s'] / 1e9:.1f} GB/s; on [M, 512] x [512, 512] chains: hbm {cal['hbm_eff']:.2f}, "
              f"compute_decode {cal['compute_decode']:.2f}, compute_prefill {cal['compute_prefill']:.2f}; "
              f"{cal['kernel_s'] * 1e6:.1f} us/kernel, {cal['call_s'] * 1e6:.0f} us/call")
        i32, f32 = np.int32, np.float32
        for B in batches:
            exe = eng.executables()["decode", B, L // Z]
            k = kernel_count(exe.as_text())
            eff = Efficiency(hbm=cal["hbm_eff"], compute_decode=cal["compute_decode"],
                             compute_prefill=cal["compute_prefill"], kernel_overhead=cal["kernel_s"],
                             step_overhead=cal["call_s"], kernels_per_layer=max(1, round(k / layers)),
                             ep_imbalance=1.0, serial=True)
            pred = decode_step(mc, prof, hw, DecodeLayout(1), B, L, eff, act_bytes=4.0)
            args = (np.ones(B, i32), np.full(B, -1, i32), np.full(B, 8, i32), np.zeros((B, L // Z), i32), np.zeros(B, f32),
                    np.zeros(B, i32), np.ones(B, f32), np.zeros(B, i32), np.zeros(B, i32),
                    np.zeros((B, 1), f32), *eng.neutral_proc(B, L))

            def call():   # the engine's own call (weights, cache, routing counts, inputs)
                jax.block_until_ready(eng.execute("decode", (B, L // Z), args))

            meas = _median_time(call, reps)
            rows.append(dict(calibration=cal, model=name, exe=f"decode B={B}", moe_impl="segment",
                             flops=pred.flops, hbm_bytes=pred.hbm_bytes, kernels=k, measured_s=meas,
                             predicted_s=pred.seconds, error=pred.seconds / meas - 1, parts=pred.parts()))
        for T in chunks:
            exe = eng.executables()["prefill", 1, T]
            k = kernel_count(exe.as_text())
            eff = Efficiency(hbm=cal["hbm_eff"], compute_decode=cal["compute_decode"],
                             compute_prefill=cal["compute_prefill"], kernel_overhead=cal["kernel_s"],
                             step_overhead=cal["call_s"], kernels_per_layer=max(1, round(k / layers)),
                             ep_imbalance=1.0, serial=True)
            t_pred, _ = prefill_time(mc, prof, hw, PrefillLayout(1, "tp"), T, eff, act_bytes=4.0, batch=1)
            t_pred += eff.step_overhead
            pt = np.zeros(ec.pages_per_seq, np.int32)
            pt[: T // Z] = np.arange(1, T // Z + 1)

            def callp():
                one = lambda v, dt: np.full(1, v, dt)
                out = eng.execute("prefill", (1, T), (np.ones((1, T), np.int32), one(0, i32), one(T, i32),
                                                    one(T - 1, i32), pt[None], one(0, f32), one(0, i32), one(1, f32),
                                                    one(0, i32), *eng.neutral_proc(1, ec.pages_per_seq * Z)))
                jax.block_until_ready(out)

            meas = _median_time(callp, reps)
            rows.append(dict(calibration=cal, model=name, exe=f"prefill T={T}", moe_impl="segment", flops=float("nan"),
                             hbm_bytes=mc.total_weight_bytes, kernels=k, measured_s=meas, predicted_s=t_pred,
                             error=t_pred / meas - 1, parts=f"{t_pred * 1e3:.2f} ms"))
    return dict(rows=rows)


def main(argv):
    del argv
    res = run(FLAGS.reps)
    print("\n| model | executable | MoE path | GFLOP | MB streamed | kernels | measured ms | predicted ms | error | "
          "predicted parts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['exe']} | {r['moe_impl'] or '-'} | {r['flops'] / 1e9:.3f} | "
              f"{r['hbm_bytes'] / 1e6:.1f} | {r['kernels']} | {r['measured_s'] * 1e3:.2f} | "
              f"{r['predicted_s'] * 1e3:.2f} | {r['error']:+.0%} | {r['parts']} |")
    errs = [abs(r["error"]) for r in res["rows"]]
    print(f"\n|error| median {statistics.median(errs):.0%}, max {max(errs):.0%} over {len(errs)} executables")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)
