"""EPLB figures: how much redundant experts balance a skewed routing, and what it buys.

    python -m bench.eplb --part=placement   # V3 dims (256 experts, 8 groups): max/mean copies per EP rank
    python -m bench.eplb --part=serve       # fake ep=8 devices: decode tok/s and measured balance, before/after
    python -m bench.eplb --part=v3          # V3 dims with 288 slots on ep=8 and ep=16: bytes, compile (no weights)

placement: Zipf-like expert popularity (exponent --zipf, experts in a random order per layer) over DeepSeek-V3's 256
experts in 8 groups; max/mean expected copies per rank for the uniform placement (256 slots, one per expert) and
`sharding.eplb.balanced_placement` with 32 redundant slots (288), flat and hierarchical (2 or 4 domains), on
ep = 8, 16, 32. Placed from one sample of routing counts, scored on another (multinomial draws of 64k copies).

serve: a small MoE model (32 experts, 4 per token) whose routing is skewed by its correction bias, served with
`LLM` on a fake ep=8 decode mesh (8 CPU devices on this host's cores). A calibration run's on-device routing counts
(`serving.expert_stats`) place 32 redundant slots; held-out prompts are then decoded with and without them (greedy
tokens must be equal), tok/s is the worst of --repeats runs, and the balance is the held-out counts per EP rank.
On fake devices all ranks share the host's cores, so balance itself saves no time; what changes is whether the
dispatch's capacity buckets overflow (then every device takes the exact all-gather fallback).

v3: `checkpoints.abstract_model` of V3 (2 layers: 1 dense + 1 MoE, FP8) with 32 redundant slots, placed for a
decode mesh of ep=8 and ep=16 (fake devices; a child process per mesh size): slot weights per device, and the
absorbed forward for 64 rows lowered and compiled for CPU (seconds, XLA temporaries).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "placement", ["placement", "serve", "v3", "v3_child"], "what to run")
flags.DEFINE_float("zipf", 1.0, "placement: popularity exponent (several with --zipfs)")
flags.DEFINE_list("zipfs", ["0.6", "1.0", "1.4"], "placement: exponents reported")
flags.DEFINE_integer("repeats", 3, "serve: timed runs (worst reported)")
flags.DEFINE_integer("ep", 8, "v3_child: expert shards")
flags.DEFINE_float("skew", 0.8, "serve: routing skew (correction bias = -skew * log(1 + popularity rank))")


def placement() -> list[dict]:
    import numpy as np

    from model.moe import uniform_placement
    from sharding import eplb

    E, G, R, copies = 256, 8, 32, 65536
    rows = []
    for s in map(float, FLAGS.zipfs):
        rng = np.random.default_rng(0)
        pop = 1.0 / (rng.permutation(E) + 1.0) ** s
        pop /= pop.sum()
        fit, test = rng.multinomial(copies, pop), rng.multinomial(copies, pop)
        for S in (8, 16, 32):
            row = {"zipf": s, "ep": S, "uniform_256": round(eplb.imbalance(np.arange(E), test, S), 3),
                   "uniform_288": round(eplb.imbalance(uniform_placement(E, E + R), test, S), 3)}
            for d in (1, 2, 4):
                if S % d == 0:
                    p = eplb.balanced_placement(fit, E + R, S, n_domains=d, n_groups=G)
                    row[f"eplb_288_d{d}"] = round(eplb.imbalance(p, test, S), 3)
                    if d > 1:   # what the engine uses: hierarchical unless > 5% worse than flat
                        c = eplb.choose_placement(fit, E + R, S, n_domains=d, n_groups=G)
                        row[f"chosen_d{d}"] = round(eplb.imbalance(c, test, S), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def serve() -> dict:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from model.config import preset
    from model.deepseek import DeepseekV3
    from serving import LLM, EngineConfig, SamplingParams
    from sharding import eplb

    cfg = preset("tiny").replace(hidden_size=128, moe_intermediate_size=64, n_routed_experts=32, n_group=4,
                                 topk_group=2, num_experts_per_tok=4, num_hidden_layers=3, vocab_size=1024)
    model = DeepseekV3(cfg, rngs=nnx.Rngs(0))
    for i, moe in enumerate(eplb.moe_layers(model)):
        rank = np.random.default_rng(i).permutation(cfg.n_routed_experts)
        moe.e_score_correction_bias.set_value(jnp.asarray(-FLAGS.skew * np.log1p(rank), jnp.float32))
    ec = EngineConfig(page_size=16, num_pages=160, max_model_len=128, prefill_buckets=(32,), prefill_rows=(1, 4),
                      decode_buckets=(32,), decode_windows=(8,), decode_steps=8, expert_stats_interval=1)
    rng = np.random.default_rng(1)
    calib = [rng.integers(0, cfg.vocab_size, 24).tolist() for _ in range(32)]
    held = [rng.integers(0, cfg.vocab_size, 24).tolist() for _ in range(32)]
    sp = SamplingParams(max_tokens=64, temperature=0.0)
    E, P, S = cfg.n_routed_experts, cfg.n_routed_experts + 32, 8

    def run(m, name):
        llm = LLM(model=m, engine_config=ec, decode_mesh="ep=8")
        eng = llm.decode_engine
        llm.generate(calib, sp)                    # warm-up, and the calibration counts
        c0 = eng.expert_stats.counts()
        times, outs = [], None
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(held, sp)
            times.append(time.perf_counter() - t0)
        c1 = eng.expert_stats.counts()
        held_counts = (c1 - c0) / FLAGS.repeats
        layers = [m.expert_logical[...] if m.cfg.n_redundant_experts else None
                  for m in eplb.moe_layers(nnx.merge(eng.graphdef, eng.params))]
        n_dec = sum(len(o.token_ids) for o in outs)
        imb = [eplb.imbalance(np.asarray(lp) if lp is not None else np.arange(E), h, S)
               for lp, h in zip(layers, held_counts) if h.sum()]
        res = {"name": name, "tok_s_worst": round(n_dec / max(times), 1), "tok_s_best": round(n_dec / min(times), 1),
               "imbalance_per_layer": [round(x, 3) for x in imb]}
        print(json.dumps(res), flush=True)
        llm.close()
        return res, c0, [o.token_ids for o in outs]

    base, calib_counts, ref = run(model, "no EPLB (32 experts over 8 ranks)")
    rows = [eplb.balanced_placement(c + 1, P, S, n_groups=cfg.n_group) for c in calib_counts]
    wide, _, toks = run(eplb.expand(model, 32, rows), "EPLB (64 slots, placed from the calibration counts)")
    same = toks == ref
    print(json.dumps({"greedy_tokens_equal": same}), flush=True)
    assert same, "EPLB changed the greedy tokens"
    return {"base": base, "eplb": wide, "equal": same, "experts": cfg.n_routed_experts}


def v3_child() -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={FLAGS.ep}"
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import checkpoints
    from model.config import preset
    from sharding import DECODE_RULES, Topology, eplb
    from sharding.plan import weight_bytes_per_device

    v3 = preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    mesh = Topology.preset(f"cpu:{FLAGS.ep}/1").allocate("eplb-v3", ep=FLAGS.ep)
    plain = checkpoints.abstract_model(v3, quant="fp8", mesh=mesh, rules=DECODE_RULES)
    wide = checkpoints.abstract_model(v3.replace(n_redundant_experts=32), quant="fp8", mesh=mesh, rules=DECODE_RULES)
    (moe,) = eplb.moe_layers(wide)
    codes = moe.experts_gate_proj.get_value().codes
    graph, state = nnx.split(wide)
    t0 = time.perf_counter()
    low = jax.jit(lambda s, t: nnx.merge(graph, s)(t)).lower(state, jax.ShapeDtypeStruct((64, 1), jnp.int32))
    exe = low.compile()
    out = {"ep": FLAGS.ep, "slots": int(codes.shape[0]), "slots_per_device": int(codes.sharding.shard_shape(
        codes.shape)[0]), "extra_bytes_per_device_per_moe_layer": int(weight_bytes_per_device(wide)
                                                                      - weight_bytes_per_device(plain)),
           "compile_s": round(time.perf_counter() - t0, 1),
           "temp_bytes": int(exe.memory_analysis().temp_size_in_bytes),
           "all_to_all": "all-to-all" in exe.as_text()}
    print(json.dumps(out), flush=True)
    return out


def main(argv):
    del argv
    if FLAGS.part == "placement":
        placement()
    elif FLAGS.part == "serve":
        serve()
    elif FLAGS.part == "v3_child":
        v3_child()
    else:
        for ep in (8, 16):
            subprocess.run([sys.executable, "-m", "bench.eplb", "--part=v3_child", f"--ep={ep}"], check=True,
                           timeout=1200)


if __name__ == "__main__":
    app.run(main)
