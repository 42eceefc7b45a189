"""One decode step of a worker group (one instance over several processes): lowered and compiled inside a real
multi-process jax.distributed group, its collectives split into bytes that stay in a domain and bytes that cross.

    python -m bench.group_comm                                  # DeepSeek-V3 DEP16: 2 processes x 8 devices
    python -m bench.group_comm --mesh=dp=2,ep=8 --layers=2      # the same devices, EP groups of 8 per host
    python -m bench.group_comm --config=tiny --devices=2 --mesh=dp=4   # seconds (tests)

N child processes (host = process: each process is one domain, as an 8-GPU HGX host is one NVLink domain) join
with `jax.distributed` (`serving.group.join`), place the `deepseek-v3` preset *abstractly* (no weights) on the
group's global decode mesh (DECODE_RULES: attention ranks and routed experts over every dp x ep device — wide EP),
and lower and compile one absorbed decode step of the `Engine` (batch `--batch` per instance, a `--context`-token
page window). Process 0 reads the HLO after SPMD partitioning (XLA's dump; the final CPU module upcasts bf16
collectives) and attributes every collective's wire bytes per device (`sharding.hlo`: all-to-all and all-gather
(n-1)/n x R, all-reduce 2(n-1)/n x R, ...) to in-domain or cross-domain by the share of each device's peers that
live in another process. Like `bench.comm_bytes`, only `--layers` layers are lowered (1 dense, the rest MoE) and
per-layer bytes are scaled to V3's 3 dense + 58 MoE layers; MTP not included. The MoE dispatch's exact fallback
(all-gather + reduce-scatter, taken under a `lax.cond` only when a capacity bucket overflows) is reported apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("processes", 2, "processes in the group (each one domain)")
flags.DEFINE_integer("devices", 8, "CPU devices per process")
flags.DEFINE_string("mesh", "dp=16", "decode mesh of the group (dp x ep x tp = processes x devices)")
flags.DEFINE_enum("config", "deepseek-v3", ["deepseek-v3", "tiny"], "model: the V3 preset or a tiny config")
flags.DEFINE_integer("layers", 2, "layers lowered (1 dense + MoE)")
flags.DEFINE_integer("batch", 256, "decode rows of the instance (a multiple of dp x ep)")
flags.DEFINE_integer("context", 4096, "page window of the step, tokens")
flags.DEFINE_enum("dispatch", "auto", ["auto", "flat"], "MoE dispatch: auto (hierarchical when the first expert "
                  "axis crosses processes, e.g. dp=2,ep=8) or flat")
flags.DEFINE_string("json_out", "", "also write the result as JSON here")
flags.DEFINE_integer("process_id", -1, "internal: run as this member")
flags.DEFINE_string("coordinator", "", "internal")
flags.DEFINE_string("dump", "", "internal: process 0's HLO dump directory")
flags.DEFINE_float("timeout_s", 1500.0, "bound on the children")

DENSE_LAYERS, MOE_LAYERS = 3, 58   # deepseek-v3


def _model_cfg():
    from model.config import ModelConfig, preset

    if FLAGS.config == "tiny":
        return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=FLAGS.layers, num_attention_heads=4, n_shared_experts=1,
                           n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
                           q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8,
                           first_k_dense_replace=1, num_nextn_predict_layers=0)
    return preset("deepseek-v3").replace(num_hidden_layers=FLAGS.layers, first_k_dense_replace=1,
                                         num_nextn_predict_layers=0)


def _child() -> dict | None:
    import jax

    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    import jax.numpy as jnp

    import checkpoints
    from serving.config import EngineConfig, parse_mesh_spec
    from serving.engine import Engine
    from serving.group import GroupSpec, join
    from sharding import DECODE_RULES, Topology
    from sharding.hlo import collectives

    spec = GroupSpec(FLAGS.coordinator, FLAGS.processes, FLAGS.process_id, fence_s=60.0,
                     init_timeout_s=FLAGS.timeout_s)
    join(spec)
    topo = Topology.from_devices()
    mesh = topo.allocate("decode", **parse_mesh_spec(FLAGS.mesh), allow_cross_domain=True)
    report = topo.placement("decode").report
    cfg = _model_cfg()
    dtype = jnp.bfloat16 if FLAGS.config != "tiny" else jnp.float32
    m = checkpoints.abstract_model(cfg, dtype=dtype, mesh=mesh, rules=DECODE_RULES)
    if FLAGS.dispatch == "flat" and m.runtime.expert_parallel is not None:
        m.runtime = m.runtime.replace(expert_parallel=dataclasses.replace(m.runtime.expert_parallel, domain_axis=None))
    dispatch = "hierarchical" if getattr(m.runtime.expert_parallel, "domain_axis", None) else "flat"
    Z = 64
    Pw = FLAGS.context // Z
    ranks = mesh.shape["dp"] * mesh.shape["ep"]
    ec = EngineConfig(page_size=Z, num_pages=Pw + 1, max_model_len=FLAGS.context, prefill_buckets=(Z,),
                      decode_buckets=(FLAGS.batch,), decode_steps=1, decode_windows=(Pw,))
    eng = Engine(m, ec, mesh=mesh, roles={"decode"}, compile=False)
    t0 = time.perf_counter()
    exe = eng.lower_decode(eng.decode_buckets[-1], Pw, 1).compile()
    compile_s = time.perf_counter() - t0
    if spec.process_id != 0:
        return None
    dumps = sorted(f for f in os.listdir(FLAGS.dump) if "after_spmd-partitioning" in f and "decode" in f)
    if not dumps:
        raise RuntimeError(f"no HLO dump after spmd-partitioning in {FLAGS.dump}")
    # partition id i runs on mesh.devices.flat[i]; its domain is its process
    domain_of = [d.process_index for d in mesh.devices.flat]
    with open(os.path.join(FLAGS.dump, dumps[-1])) as f:
        colls = collectives(f.read(), len(domain_of), domain_of)
    sums: dict[str, float] = {}
    for c in colls:
        name = c["op_name"]
        layer = "dense" if "layer0" in name else "moe" if "layer" in name or not name.startswith("jit(") else "other"
        if layer == "other" and c["op"] == "all-to-all":   # the dispatch's ops carry shard_map-relative names
            layer = "moe"
        if "ep_fallback" in name:   # the exact dispatch taken only when a capacity bucket overflows (lax.cond)
            layer = "fallback"
        for part, b in (("all", c["wire"]), ("cross", c["cross_wire"])):
            for key in (f"{layer}/{part}", f"{layer}/{c['op']}/{part}"):
                sums[key] = sums.get(key, 0.0) + b

    def step(part):
        return DENSE_LAYERS * sums.get(f"dense/{part}", 0) + MOE_LAYERS * sums.get(f"moe/{part}", 0) + sums.get(
            f"other/{part}", 0)

    del exe
    return dict(mesh=FLAGS.mesh, dispatch=dispatch, processes=FLAGS.processes, devices_per_process=FLAGS.devices, config=FLAGS.config,
                batch=eng.decode_buckets[-1], attention_ranks=ranks, context=FLAGS.context,
                compile_s=round(compile_s, 1), placement=report, n_collectives=len(colls), sums=sums,
                step_bytes=step("all"), step_cross_bytes=step("cross"), step_in_domain_bytes=step("all") - step("cross"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group() -> dict:
    coord = f"127.0.0.1:{_free_port()}"
    dump = tempfile.mkdtemp(prefix="group_comm_")
    procs = []
    try:
        for k in range(FLAGS.processes):
            # no persistent compilation cache: a cache hit skips XLA's passes and leaves no HLO dump to read
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
            xf = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
                  and "xla_dump" not in f]
            if k == 0:
                xf += [f"--xla_dump_to={dump}", "--xla_dump_hlo_pass_re=spmd-partitioning"]
            env["XLA_FLAGS"] = " ".join(xf)
            args = [sys.executable, "-m", "bench.group_comm", f"--process_id={k}", f"--coordinator={coord}",
                    f"--dump={dump}", f"--processes={FLAGS.processes}", f"--devices={FLAGS.devices}",
                    f"--mesh={FLAGS.mesh}", f"--config={FLAGS.config}", f"--layers={FLAGS.layers}",
                    f"--batch={FLAGS.batch}", f"--context={FLAGS.context}", f"--timeout_s={FLAGS.timeout_s}",
                    f"--dispatch={FLAGS.dispatch}"]
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=FLAGS.timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(dump, ignore_errors=True)
    for k, (p, (out, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise RuntimeError(f"group member {k} failed ({p.returncode}):\n{err[-4000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.process_id >= 0:
        r = _child()
        if r is not None:
            print(json.dumps(r), flush=True)
        return
    r = run_group()
    mb = lambda x: f"{x / 1e6:.2f}"
    print(f"{r['config']} decode step ({r['dispatch']} MoE dispatch), mesh {r['mesh']} over {r['processes']} processes x "
          f"{r['devices_per_process']} devices (host = process = domain), batch {r['batch']}, "
          f"{r['attention_ranks']} attention ranks, context {r['context']}; compiled in {r['compile_s']} s; "
          f"{r['n_collectives']} collectives\n{r['placement']}")
    print("| per device | all wire MB | cross-domain MB | in-domain MB |\n|---|---|---|---|")
    s = r["sums"]
    for layer in ("dense", "moe", "fallback"):
        for op in ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute"):
            a, c = s.get(f"{layer}/{op}/all", 0), s.get(f"{layer}/{op}/cross", 0)
            if a:
                what = "one MoE layer's overflow fallback" if layer == "fallback" else f"one {layer} layer"
                print(f"| {what}, {op} | {mb(a)} | {mb(c)} | {mb(a - c)} |")
    print(f"| step (3 dense + 58 MoE layers + head; no overflow) | {mb(r['step_bytes'])} | {mb(r['step_cross_bytes'])} | "
          f"{mb(r['step_in_domain_bytes'])} |")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    app.run(main)
