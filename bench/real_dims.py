"""DeepSeek-V3 at real dimensions on a CPU host: the 671B plan, executables built and exported without weights,
and a 2-layer real-dims model with random weights served end to end.

    python -m bench.real_dims --part=plan     # all 61 layers, abstract: memory plan, CPU compile, cuda export
    python -m bench.real_dims --part=serve    # 2 real-dims layers (16 experts), random FP8 weights, ep=4 engine
    python -m bench.real_dims --part=parity   # that checkpoint: FP8 kept vs dequantized-bf16 logits

part=plan, for FP8 (DeepSeek's release format kept) and NVFP4 (FP4 experts + FP8 other linears), on an 8-device
fake mesh (decode: ep=8, prefill: tp=8): per-device weight bytes (`sharding.plan`), the decode and prefill
executables lowered and compiled for CPU with the kernels in the Pallas interpreter (time, XLA temporaries:
the GPU algorithm's buffers; the XLA dequantize path would show XLA:CPU's dense `ragged_dot` expansion instead),
and the same executables exported for the
cuda platform with `Runtime(platform="cuda")` — the Pallas Triton kernels inside (custom calls counted).

part=serve: writes a DeepSeek-format checkpoint (block-FP8 e4m3 linears + `weight_scale_inv`, bf16 embedding /
head / norms, f32 router) with V3's hidden, attention, latent, FFN and vocabulary sizes but 2 layers (1 dense, 1
MoE with 16 routed experts), then serves it through `LLM` (decode mesh ep=4) with the FP8 weights kept and with
the experts requantized to NVFP4. part=parity checks the FP8 model's logits against its dequantized-bf16 twin.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

flags.DEFINE_enum("part", "plan", ["plan", "serve", "parity"], "what to run")
flags.DEFINE_string("dir", "/tmp/tandem-real-dims", "where part=serve writes its checkpoint")
flags.DEFINE_integer("decode_batch", 64, "decode batch bucket (plan)")
flags.DEFINE_integer("max_model_len", 4096, "max_model_len of the executables (plan)")
flags.DEFINE_integer("prefill_chunk", 512, "prefill chunk bucket (plan)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "part=parity: compute dtype")
flags.DEFINE_bool("compile_cpu", True, "part=plan: also compile for CPU (about a minute per executable)")
FLAGS = flags.FLAGS


def _cuda_export(eng) -> dict:
    """Export every executable of an abstract engine for cuda (`jax.export`, serialized); count the Triton
    custom-call sites (identical kernels are outlined into shared functions, so sites < calls per step)."""
    out = {}
    for key, exp in eng.exported("cuda").items():
        txt = exp.mlir_module()
        out["/".join(map(str, key))] = {
            "triton_call_sites": txt.count("__gpu$xla.gpu.triton"),
            "kernels": sorted(set(k for k in ("fp8_block_matmul", "fp8_block_grouped_matmul", "fp4_nvfp4_matmul",
                                              "fp4_nvfp4_grouped_matmul") if k in txt)),
            "serialized_mb": round(len(exp.serialize()) / 1e6, 1), "platforms": list(exp.platforms)}
    return out


def plan_part():
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import checkpoints
    from model.config import preset
    from model.runtime import Runtime
    from serving.engine import Engine
    from serving.config import EngineConfig
    from sharding import DECODE_RULES, PREFILL_RULES, Topology
    from sharding.plan import DEVICE_MEMORY, MemoryPlan, kv_bytes_per_token, weight_bytes_per_device

    cfg = preset("deepseek-v3")
    L, Z = FLAGS.max_model_len, 64
    results = {}
    for quant in ("fp8", "nvfp4"):
        q = None if quant == "fp8" else quant
        for pool, spec, rules in (("decode", dict(ep=8), DECODE_RULES), ("prefill", dict(tp=8), PREFILL_RULES)):
            topo = Topology.preset("cpu:8/1")
            mesh = topo.allocate(pool, **spec)
            ec = EngineConfig(page_size=Z, num_pages=8 * (L // Z) + 1, max_model_len=L,
                              prefill_buckets=(FLAGS.prefill_chunk,), decode_buckets=(FLAGS.decode_batch,),
                              decode_steps=1, decode_windows=(L // Z,))
            roles = {"decode"} if pool == "decode" else {"prefill"}
            r = {"mesh": spec}
            t0 = time.perf_counter()
            m = checkpoints.abstract_model(cfg, quant=q or "fp8", fp8_linears=True, mesh=mesh, rules=rules,
                                           runtime=Runtime(platform="cuda"))
            r["weights_gb_per_device"] = weight_bytes_per_device(m) / 1e9
            eng = Engine(m, ec, mesh=mesh, roles=roles, compile=False)
            r["cuda_export"] = _cuda_export(eng)
            r["cuda_lower_s"] = round(time.perf_counter() - t0, 1)
            if FLAGS.compile_cpu:   # the same graph for CPU, the kernels run by the Pallas interpreter
                mc = checkpoints.abstract_model(cfg, dtype="float32", quant=q or "fp8", fp8_linears=True, mesh=mesh,
                                                rules=rules, runtime=Runtime(matmul_impl="pallas_interpret"))
                e2 = Engine(mc, ec, mesh=mesh, roles=roles, compile=False)
                for key, low in e2.lowered().items():
                    t1 = time.perf_counter()
                    exe = low.compile()
                    ma = exe.memory_analysis()
                    r["cpu_" + "/".join(map(str, key))] = {"compile_s": round(time.perf_counter() - t1, 1),
                                                           "temp_gb": ma.temp_size_in_bytes / 1e9}
            kv = kv_bytes_per_token(cfg)
            temp = max((v["temp_gb"] for k, v in r.items() if k.startswith("cpu_")), default=0.0) * 1e9
            r["kv_kb_per_token"] = kv / 1e3
            r["fit"] = {}
            for dev, mem in DEVICE_MEMORY.items():
                p = MemoryPlan(mem, 0.9, int(r["weights_gb_per_device"] * 1e9), int(temp), kv, Z)
                r["fit"][dev] = {"kv_budget_gb": round(max(p.budget, 0) / 1e9, 2), "kv_tokens": p.kv_tokens}
            results[f"{quant}/{pool}"] = r
            print(json.dumps({f"{quant}/{pool}": r}, indent=1), flush=True)
    return results


# ---- part=serve ------------------------------------------------------------------------------------------------
def write_checkpoint(path: str, cfg) -> float:
    """A DeepSeek-format checkpoint of `cfg` with random weights: FP8 linears (random e4m3 codes, scales so that
    weights are ~N(0, 1/fan_in)), bf16 embedding/head/norms, f32 router. Returns GB written."""
    import ml_dtypes
    import numpy as np

    from checkpoints.loader import plans
    from checkpoints.safetensors_io import write
    from checkpoints.loader import _NoTensors

    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, p in plans(cfg, _NoTensors()).items():
        for src in p.sources:
            shape = _hf_shape(name, p, cfg)
            if p.kind == "copy":
                if name.endswith("e_score_correction_bias"):
                    tensors[src] = np.zeros(shape, np.float32)
                elif name == "embed_tokens":
                    tensors[src] = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                else:
                    tensors[src] = np.ones(shape, ml_dtypes.bfloat16)
            elif name.endswith("mlp.gate"):
                tensors[src] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])).astype(np.float32)
            elif name in ("lm_head",) or name.endswith("eh_proj"):
                tensors[src] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])).astype(np.float32).astype(ml_dtypes.bfloat16)
            else:   # FP8 codes uniform over +-[0, 448) and the block scale making them ~1/sqrt(fan_in)
                codes = rng.uniform(-448, 448, shape).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
                sc = np.full((-(-shape[0] // 128), -(-shape[1] // 128)), 1.0 / (448 * np.sqrt(shape[1] / 3)),
                             np.float32)
                tensors[src], tensors[src[:-len("weight")] + "weight_scale_inv"] = codes, sc
    write(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    d = cfg.to_hf_dict()
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=1)
    return sum(t.nbytes for t in tensors.values()) / 1e9


def _hf_shape(name, p, cfg):
    """HF [out, in] (or as stored) shape of one source tensor of plan `p` for weight `name`."""
    import math

    from flax import nnx

    from model.deepseek import DeepseekV3

    global _SHAPES
    if "_SHAPES" not in globals():
        abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0)))
        _SHAPES = {".".join(map(str, k)): v.get_value().shape for k, v in nnx.to_flat_state(nnx.state(abstract))}
    shape = _SHAPES[name]
    if p.kind == "copy":
        return shape
    if p.kind == "experts":
        shape = shape[1:]
    K = math.prod(shape[:p.k_ndim])
    return (math.prod(shape[p.k_ndim:]), K)


def serve_part():
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp
    import numpy as np

    import checkpoints
    from model.config import preset
    from serving import LLM, EngineConfig, SamplingParams
    from sharding import DECODE_RULES, Topology
    from sharding.plan import weight_bytes_per_device

    cfg = preset("deepseek-v3").replace(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=16,
                                        n_group=8, topk_group=4, num_nextn_predict_layers=0)
    path = FLAGS.dir
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(path, "config.json")):
        gb = write_checkpoint(path, cfg)
        print(f"wrote {path}: {gb:.2f} GB in {time.perf_counter() - t0:.0f}s", flush=True)
    results = {}
    prompts = [list(range(1, 21)), list(range(100, 107))]
    ec = EngineConfig(page_size=16, num_pages=16, max_model_len=128, prefill_buckets=(32,), decode_buckets=(4,),
                      decode_steps=1, decode_windows=(8,))
    for quant in (None, "nvfp4"):
        t1 = time.perf_counter()
        # vocabulary-parallel embedding and head over the 4 EP ranks: 129,280 x 7,168 twice would otherwise be
        # replicated on every (fake, host-memory) device
        # (the XLA path dequantizes each weight whole per step; one decode step per dispatch keeps XLA from
        # hoisting every dequantized weight out of a multi-step loop, which 4 fake devices in 24 GB cannot hold)
        with LLM(path, engine_config=ec, decode_mesh="ep=4", quant=quant,
                 decode_rules=DECODE_RULES.replace(vocab="ep")) as llm:
            build_s = time.perf_counter() - t1
            m = llm.decode_engine.model
            kinds = sorted({type(v.get_value()).__name__ for _, v in __import__("flax").nnx.iter_graph(m)
                            if hasattr(v, "get_value")})
            t2 = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
            gen_s = time.perf_counter() - t2
            r = {"weights_gb_per_device": weight_bytes_per_device(m) / 1e9, "value_types": kinds,
                 "load_and_compile_s": round(build_s, 1), "compile_s": round(llm.decode_engine.compile_seconds, 1),
                 "generate_s": round(gen_s, 2), "tok_s": round(sum(len(o.token_ids) for o in outs) / gen_s, 1),
                 "tokens": [o.token_ids for o in outs]}
        results[quant or "fp8"] = r
        print(json.dumps({quant or "fp8": r}), flush=True)
        del llm, m
        import gc

        gc.collect()
    return results


def parity_part():
    """FP8 kept vs the same weights dequantized to bf16: teacher-forced logits of the part=serve checkpoint on one
    device, one model at a time (host memory)."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    import checkpoints

    ids = jnp.asarray([list(range(1, 21))], jnp.int32)
    fwd = jax.jit(lambda m, t: m(t))
    out = {}
    for keep in (True, False):
        m = checkpoints.load(FLAGS.dir, keep_fp8=keep, dtype=FLAGS.dtype)
        out[keep] = np.asarray(fwd(m, ids))
        del m
        gc.collect()
        jax.clear_caches()
    a, b = out[True], out[False]
    r = {"dtype": FLAGS.dtype, "max_abs_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(b).max()),
         "rel_diff": float(np.abs(a - b).max() / np.abs(b).max()),
         "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}
    print(json.dumps({"parity": r}), flush=True)
    return r


def main(argv):
    del argv
    return {"plan": plan_part, "serve": serve_part, "parity": parity_part}[FLAGS.part]()


if __name__ == "__main__":
    app.run(main)
