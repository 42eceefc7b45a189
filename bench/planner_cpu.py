"""Validation of the planner's step model on this CPU: predicted vs measured decode and prefill steps.

    python -m bench.planner_cpu            # shipped model + a larger random config, batch 1/4/16, prefill 32/128

The machine is calibrated first, with generic probes and nothing of the model (`calibrate`): the f32 matmul peak
(1024^3), the weight-streaming bandwidth (a matvec over a 256 MiB matrix), what XLA:CPU reaches on [M, 512] x
[512, 512] dot chains (M=1: `hbm` efficiency, M=16: `compute_decode`, M=128: `compute_prefill`), the fixed cost
per kernel (a chain of tiny links) and per executable call (a 300-leaf argument list). Then, for each engine
executable (1-step decode at a batch, prefill at a chunk), the planner's `executable_step` predicts its time from
what the compiled executable says it does — FLOPs from XLA's cost analysis, kernels counted in its HLO, HBM bytes
= the weights it streams (the MoE path's own: all local experts, or the picked ones for `gather`) + the KV it
reads — with compute and memory time added (`serial`: XLA:CPU runs one op at a time), and the executable is timed
(median of 15 calls on random weights, after a warm-up call).
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


def run(reps: int) -> dict:
    from sharding.hlo import kernel_count
    from planner import Efficiency, Hardware, executable_step
    from serving.engine import Engine
    from serving.config import EngineConfig

    rows = []
    for name, cfg in _configs().items():
        m = _model(name, cfg)
        mcfg = m.cfg
        Z, L = 16, 256
        ec = EngineConfig(page_size=Z, num_pages=16 * (L // Z) + 2, max_model_len=L, prefill_buckets=(32, 128),
                          decode_buckets=(1, 4, 16), decode_steps=1, decode_windows=(L // Z,))
        eng = Engine(m, ec)
        params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(eng.params))
        # calibrated right before this model's timings: this shared machine drifts by tens of % within minutes
        cal = calibrate(reps)
        hw = Hardware("cpu", 24e9, cal["stream_bytes_s"] / 1e9, cal["matmul_flops"], cal["matmul_flops"], None, 1, 1.0,
                      1.0, 0.0, "this CPU (calibrated)")
        eff = Efficiency(hbm=cal["hbm_eff"], compute_decode=cal["compute_decode"],
                         compute_prefill=cal["compute_prefill"], kernel_overhead=cal["kernel_s"],
                         step_overhead=cal["call_s"])
        print(f"calibration: matmul {cal['matmul_flops'] / 1e9:.1f} GFLOP/s, streaming "
              f"{cal['stream_bytes_s'] / 1e9:.1f} GB/s; on [M, 512] x [512, 512] chains: hbm {eff.hbm:.2f}, "
              f"compute_decode {eff.compute_decode:.2f}, "
              f"compute_prefill {eff.compute_prefill:.2f}; {cal['kernel_s'] * 1e6:.1f} us/kernel, "
              f"{cal['call_s'] * 1e6:.0f} us/call")
        embed = mcfg.vocab_size * mcfg.hidden_size * 4
        kv_tok = mcfg.num_hidden_layers * mcfg.cache_width * 4
        for B in (1, 4, 16):
            exe = eng.executables()["decode", B, L // Z]
            ca = exe.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            k = kernel_count(exe.as_text())
            E, X = mcfg.n_routed_experts, mcfg.num_experts_per_tok
            # the weights a step streams: all but the embedding table (B rows gathered); XLA:CPU's MoE paths read
            # every local expert (dense / capacity) or the picked ones (gather): the executable's own choice
            impl = eng.moe_impl(B)
            hbm = params_bytes - embed + B * L * kv_tok
            if impl == "gather":
                expert = sum(x.size * 4 for p, x in jax.tree_util.tree_leaves_with_path(eng.params)
                             if "experts_" in jax.tree_util.keystr(p) and "shared" not in jax.tree_util.keystr(p))
                hbm -= expert * (1 - (1 - (1 - X / E) ** B))
            pred = executable_step(hw, eff, float(ca.get("flops", 0)), hbm, k, compute_eff=eff.compute_decode,
                                   serial=True)
            i32, f32 = np.int32, np.float32
            args = (np.ones(B, i32), np.full(B, 8, i32), np.zeros((B, L // Z), i32), np.zeros(B, f32),
                    np.zeros(B, i32), np.ones(B, f32), np.zeros(B, i32), np.zeros(B, i32),
                    np.zeros((B, eng._q_width), f32))

            def call():
                out = exe(eng.params, eng.cache, *args)
                eng.cache = out[-1]
                jax.block_until_ready(out)

            meas = _median_time(call, reps)
            rows.append(dict(calibration=cal, model=name, exe=f"decode B={B}", moe_impl=impl, flops=pred.flops,
                             hbm_bytes=hbm,
                             kernels=k, measured_s=meas, predicted_s=pred.seconds, error=pred.seconds / meas - 1,
                             parts=pred.parts()))
        for T in (32, 128):
            exe = eng.executables()["prefill", 1, T]
            ca = exe.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            k = kernel_count(exe.as_text())
            pred = executable_step(hw, eff, float(ca.get("flops", 0)), params_bytes - embed + T * kv_tok, k,
                                   compute_eff=eff.compute_prefill, serial=True)
            pt = np.zeros(ec.pages_per_seq, np.int32)
            pt[: T // Z] = np.arange(1, T // Z + 1)

            def callp():
                one = lambda v, dt: np.full(1, v, dt)
                out = exe(eng.params, eng.cache, np.ones((1, T), np.int32), one(0, i32), one(T, i32), one(T - 1, i32),
                          pt[None], one(0, f32), one(0, i32), one(1, f32), one(0, i32))
                eng.cache = out[-1] if isinstance(out, tuple) else out
                jax.block_until_ready(out)

            meas = _median_time(callp, reps)
            rows.append(dict(calibration=cal, model=name, exe=f"prefill T={T}", moe_impl=eng.moe_impl(T),
                             flops=pred.flops,
                             hbm_bytes=params_bytes - embed + T * kv_tok, kernels=k, measured_s=meas,
                             predicted_s=pred.seconds, error=pred.seconds / meas - 1, parts=pred.parts()))
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
