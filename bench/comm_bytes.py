"""Per-device communication bytes of one decode step, from the compiled (SPMD-partitioned) HLO.

    python -m bench.comm_bytes --ep=8,16,32 --tp=4,8 --batch=256

For each (ep, tp) a subprocess with ep*tp fake CPU devices builds the `deepseek-v3` preset *abstractly*
(`nnx.eval_shape`: no weights exist), puts every weight's ShapeDtypeStruct on its DECODE_RULES sharding, lowers
and compiles one absorbed-MLA decode step (T=1, a contiguous latent cache) and reads every collective in the HLO
module right after SPMD partitioning (dumped by XLA; the final CPU executable has bf16 collectives upcast to f32): all-to-all, all-gather, all-reduce, reduce-scatter, collective-permute. To keep compile time sane
only 1 dense + 1 MoE layer are lowered; per-layer bytes (attributed by the `layer{i}` named scopes) are scaled by
DeepSeek-V3's 3 dense + 58 MoE layers, plus the embedding/head once (MTP not included).

Bytes per device are wire bytes under the usual algorithms, for a group of n devices and a per-device result of
R bytes: all-to-all and all-gather (n-1)/n*R, reduce-scatter (n-1)*R, all-reduce 2(n-1)/n*R (ring),
collective-permute R. Time = bytes / per-device bandwidth, latency ignored.

The MoE dispatch has two branches under one lax.cond: the capacity all_to_all path (normal) and the exact
all_gather/psum_scatter fallback taken when a bucket overflows; they are reported separately.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from sharding.hlo import collectives

FLAGS = flags.FLAGS
flags.DEFINE_list("ep", ["8", "16", "32"], "expert-parallel sizes")
flags.DEFINE_list("tp", ["4", "8"], "tensor-parallel sizes")
flags.DEFINE_integer("batch", 256, "decode batch (sequences per step) of the pool (dp=1)")
flags.DEFINE_integer("context", 4096, "latent cache length per sequence (abstract; no memory is allocated)")
flags.DEFINE_float("capacity_factor", 2.0, "EP bucket capacity factor")
flags.DEFINE_string("dtype", "bfloat16", "weight/activation dtype")
flags.DEFINE_string("topology", "hgx-b200", "topology preset for the placement report (hosts added as needed)")
flags.DEFINE_string("json_out", "", "also write the results as JSON here")
flags.DEFINE_bool("child", False, "internal: run one configuration in this process")
flags.DEFINE_string("hlo_dump_dir", "", "internal: where XLA dumps the module after SPMD partitioning")

DENSE_LAYERS, MOE_LAYERS = 3, 58   # deepseek-v3: first_k_dense_replace=3 of 61


def _child(ep: int, tp: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import model
    from model.cache import ContiguousCache
    from sharding import DECODE_RULES, Topology, data_sharding, expert_parallel, logical_sharding, runtime_for

    n = ep * tp
    assert len(jax.devices()) == n, (len(jax.devices()), n)
    per_host = 72 if FLAGS.topology == "gb200-nvl72" else 8
    topo = Topology.preset(FLAGS.topology, hosts=max(1, -(-n // per_host)), devices=None)
    placement = topo.plan("decode", ep=ep, tp=tp, allow_cross_domain=True)
    mesh = Topology.preset(f"cpu:{n}/1").allocate("decode", ep=ep, tp=tp)   # same (dp, ep, tp) device grid

    cfg = model.preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1,
                                               num_nextn_predict_layers=0)
    dtype = jnp.dtype(FLAGS.dtype)
    rt = runtime_for(mesh, DECODE_RULES, capacity_factor=FLAGS.capacity_factor)
    abstract = nnx.eval_shape(lambda: model.DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype, runtime=rt))
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                       sharding=logical_sharding(v.get_metadata().get("axes"), mesh, DECODE_RULES)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    B, S = FLAGS.batch, FLAGS.context
    cache_shape = (cfg.num_hidden_layers, B, S, cfg.cache_width)
    cache = jax.ShapeDtypeStruct(cache_shape, dtype, sharding=data_sharding((None, "batch", None, None),
                                                                            cache_shape, mesh, DECODE_RULES))
    toks = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=data_sharding(("batch",), (B,), mesh, DECODE_RULES))

    def step(params, tokens_B, positions_B, cache):
        m = nnx.merge(graphdef, params)
        logits, _, cache = m.forward(tokens_B[:, None], positions_B[:, None], cache=ContiguousCache(),
                                     state=cache, absorbed=True)
        return jnp.argmax(logits[:, 0], -1), cache

    t0 = time.time()
    compiled = jax.jit(step, donate_argnums=(3,)).lower(params, toks, toks, cache).compile()
    compile_s = time.time() - t0
    # Read the module right after SPMD partitioning: it has every collective with the program's dtypes. The final
    # CPU executable is no good for this: XLA:CPU upcasts bf16 collectives to f32.
    dumps = sorted(f for f in os.listdir(FLAGS.hlo_dump_dir) if "jit_step" in f and "after_spmd-partitioning" in f
                   ) if FLAGS.hlo_dump_dir else []
    if not dumps:
        raise RuntimeError("no HLO dump after spmd-partitioning; run through the parent (it sets --xla_dump_to)")
    with open(os.path.join(FLAGS.hlo_dump_dir, dumps[-1])) as f:
        colls = collectives(f.read(), n)

    def where(c):
        name = c["op_name"]
        path = "fallback" if "ep_fallback" in name else "main"
        # Ops of the shard_map body (EP dispatch) carry names relative to the body: they belong to the MoE layer.
        layer = ("dense" if "layer0" in name else "moe" if "layer1" in name or not name.startswith("jit(")
                 else "other")
        return path, layer

    sums: dict[str, float] = {}
    for c in colls:
        path, layer = where(c)
        for key in (f"{path}/{layer}", f"{path}/{layer}/{c['op']}"):
            sums[key] = sums.get(key, 0.0) + c["wire"]
    main = (DENSE_LAYERS * sums.get("main/dense", 0) + MOE_LAYERS * sums.get("main/moe", 0)
            + sums.get("main/other", 0))
    fallback_extra = MOE_LAYERS * sums.get("fallback/moe", 0)
    d = expert_parallel(mesh, DECODE_RULES, FLAGS.capacity_factor)
    return dict(ep=ep, tp=tp, devices=n, batch=B, rows_per_device=d.rows_per_device(B),
                capacity=d.capacity(B, cfg.n_routed_experts, cfg.num_experts_per_tok),
                compile_s=round(compile_s, 1), sums=sums, step_bytes=main, fallback_moe_layer_bytes=sums.get(
                    "fallback/moe", 0), step_bytes_all_fallback=main - MOE_LAYERS * sums.get("main/moe/all-to-all", 0)
                + fallback_extra, placement=placement.report, in_domain_gbs=topo.in_domain.gbytes_per_s,
                cross_domain_gbs=topo.cross_domain.gbytes_per_s, ep_cross_domain=placement.ep_cross_domain,
                tp_cross_domain=placement.tp_cross_domain, n_collectives=len(colls))


def _run_child(ep: int, tp: int) -> dict:
    env = dict(os.environ)
    dump = tempfile.mkdtemp(prefix="comm_bytes_")
    env["XLA_FLAGS"] = (" ".join(f for f in env.get("XLA_FLAGS", "").split()
                                 if "xla_force_host_platform_device_count" not in f and "xla_dump" not in f)
                        + f" --xla_force_host_platform_device_count={ep * tp} --xla_dump_to={dump}"
                        + " --xla_dump_hlo_pass_re=spmd-partitioning").strip()
    env["JAX_PLATFORMS"] = "cpu"
    args = [sys.executable, "-m", "bench.comm_bytes", "--child", f"--ep={ep}", f"--tp={tp}",
            f"--batch={FLAGS.batch}", f"--context={FLAGS.context}", f"--capacity_factor={FLAGS.capacity_factor}",
            f"--dtype={FLAGS.dtype}", f"--topology={FLAGS.topology}", f"--hlo_dump_dir={dump}"]
    try:
        p = subprocess.run(args, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    if p.returncode:
        raise RuntimeError(f"ep={ep} tp={tp} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(_child(int(FLAGS.ep[0]), int(FLAGS.tp[0]))))
        return
    rows = []
    for ep in map(int, FLAGS.ep):
        for tp in map(int, FLAGS.tp):
            r = _run_child(ep, tp)
            rows.append(r)
            print(f"# ep={ep} tp={tp}: compiled in {r['compile_s']} s, {r['n_collectives']} collectives; "
                  f"{r['placement']}", file=sys.stderr)
    print(f"deepseek-v3 decode step, batch {FLAGS.batch}, {FLAGS.dtype}, context {FLAGS.context}, "
          f"capacity_factor {FLAGS.capacity_factor}; per device, 3 dense + 58 MoE layers + embed/head\n")
    print("| ep | tp | devices | rows/dev | C | dense layer MB | MoE layer MB (a2a) | step MB | step MB, every "
          "MoE layer on fallback | µs @ 900 GB/s | µs @ 1.8 TB/s | µs @ 50 GB/s | µs HGX-B200: a2a @ 50 GB/s, "
          "rest @ 1.8 TB/s | one NVL72 rack? |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["sums"]
        us = lambda b, gbs: b / (gbs * 1e9) * 1e6
        a2a = MOE_LAYERS * s.get("main/moe/all-to-all", 0)
        mixed = us(a2a, 50.0) + us(r["step_bytes"] - a2a, 1800.0)
        print(f"| {r['ep']} | {r['tp']} | {r['devices']} | {r['rows_per_device']} | {r['capacity']} | "
              f"{_mb(s.get('main/dense', 0))} | {_mb(s.get('main/moe', 0))} "
              f"({_mb(s.get('main/moe/all-to-all', 0))}) | {_mb(r['step_bytes'])} | "
              f"{_mb(r['step_bytes_all_fallback'])} | {us(r['step_bytes'], 900):.0f} | "
              f"{us(r['step_bytes'], 1800):.0f} | {us(r['step_bytes'], 50):.0f} | {mixed:.0f} | "
              f"{'yes' if r['devices'] <= 72 else 'no'} |")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
