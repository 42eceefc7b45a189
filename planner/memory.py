"""The memory plan of one engine, printed for a model preset or checkpoint before anything is allocated.

    python -m planner.memory --model deepseek-v3 --quant fp8 --mesh ep=8 [--topology hgx-h200] [--compile]
    python -m planner.memory --model deepseek-v3 --mesh dp=8 --topology hgx-h200 --dynamo   # + Dynamo registration

The arithmetic (`sharding.plan`: weights + KV + temporaries per device, pages in a budget) is what the engine sizes
its cache with; this command adds the abstract real-dims model and, with `--compile`, the temporaries of the
engine's largest executables compiled for fake CPU devices of the mesh's shape.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp

import checkpoints
from model.config import ModelConfig, preset, presets
from model.runtime import Runtime
from serving.config import DEFAULT_PREFILL_TOKENS, EngineConfig, auto_max_batch, dynamo_registration, parse_mesh_spec
from serving.engine import Engine
from sharding.plan import DEVICE_MEMORY, TOPOLOGY_DEVICE, MemoryPlan, kv_bytes_per_token, weight_bytes_per_device
from sharding.rules import DECODE_RULES, PREFILL_RULES
from sharding.topology import Topology

# ---- CLI ---------------------------------------------------------------------------------------------------------
def _args(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m planner.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-v3", help="a preset (deepseek-v3, deepseek-r1, tiny) or an HF "
                    "checkpoint directory (its config.json)")
    ap.add_argument("--quant", default="fp8", choices=["bf16", "fp8", "nvfp4", "mxfp4", "nvfp4+dense"],
                    help="weights: bf16; fp8 = DeepSeek's block FP8 for every decoder linear; nvfp4 / mxfp4 = "
                    "FP4 routed experts + FP8 for the other linears")
    ap.add_argument("--mesh", default="ep=8", help="mesh of one engine, e.g. ep=8, dp=2,ep=4, tp=8")
    ap.add_argument("--pool", default="decode", choices=["decode", "prefill"], help="which rule set places it")
    ap.add_argument("--redundant_experts", type=int, default=0, help="EPLB: extra routed-expert slots per MoE layer "
                    "(docs/eplb.md), split over the expert axes like the others")
    ap.add_argument("--topology", default="all", help="hgx-h200 | h100-8 | hgx-b200 | gb200-nvl72 | all")
    ap.add_argument("--kv_memory_fraction", type=float, default=0.9)
    ap.add_argument("--page_size", type=int, default=64)
    ap.add_argument("--max_model_len", type=int, default=32768)
    ap.add_argument("--cache_dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="lower and compile the largest decode and prefill "
                    "executables on fake CPU devices for their temporaries (real dims: minutes)")
    ap.add_argument("--decode_batch", type=int, default=64, help="decode batch bucket compiled with --compile")
    ap.add_argument("--prefill_chunk", type=int, default=512, help="prefill chunk compiled with --compile")
    ap.add_argument("--dynamo", action="store_true", help="also print, as JSON, what a decode worker of this plan "
                    "registers with NVIDIA Dynamo (serving.dynamo: block size, total blocks, context length, max "
                    "seqs, DP size)")
    ap.add_argument("--layers", type=int, default=0, help="--compile on a model cut to this many layers and the "
                    "temporaries of the full depth taken as equal (they are per-step buffers, reused per layer); "
                    "0 = all layers")
    return ap.parse_args(argv)


def main(argv=None) -> list[MemoryPlan]:
    a = _args(argv)
    mesh_shape = parse_mesh_spec(a.mesh)
    n = math.prod(mesh_shape.values())
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", max(n, 1))   # fake devices of the mesh's shape (CPU)
    cfg = preset(a.model) if a.model in presets() else ModelConfig.from_hf(a.model)
    if a.redundant_experts:
        cfg = cfg.replace(n_redundant_experts=a.redundant_experts)
    rules = DECODE_RULES if a.pool == "decode" else PREFILL_RULES
    mesh = Topology.preset(f"cpu:{n}/1").allocate(a.pool, **mesh_shape)
    quant = None if a.quant == "bf16" else a.quant
    model = checkpoints.abstract_model(cfg, quant=quant, fp8_linears=a.quant != "bf16", mesh=mesh, rules=rules)
    weights = weight_bytes_per_device(model)
    kv = kv_bytes_per_token(cfg, a.cache_dtype)
    temp, temps = 0, {}
    if a.compile:
        temps = compile_temps(cfg, a, mesh, rules, quant)
        temp = max(temps.values())
    names = list(DEVICE_MEMORY) if a.topology == "all" else [TOPOLOGY_DEVICE[a.topology]]
    ranks = math.prod(mesh.shape[x] for x in rules.mesh_axes("pages") if x in mesh.shape)
    print(f"{a.model}: {cfg.num_hidden_layers} layers (+{cfg.num_nextn_predict_layers} MTP), "
          f"{cfg.num_params() / 1e9:.1f}B params; weights {a.quant}; {a.pool} mesh {a.mesh} ({n} devices); "
          f"KV {kv / 1e3:.1f} kB/token ({a.cache_dtype}); {ranks} attention rank(s) own separate pages "
          f"(DP attention: the mesh holds {ranks}x a device's tokens; 1 = replicated); page {a.page_size}")
    if temps:
        print("temporaries (XLA memory_analysis, compiled for fake CPU devices): "
              + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in temps.items()))
    print(f"{'device':>7} {'HBM GB':>7} {'weights GB':>11} {'temp GB':>8} {'KV budget GB':>13} {'KV tok/device':>14} "
          f"{'KV tok/mesh':>12} {'seqs @ ' + str(a.max_model_len):>12}  fits")
    out = []
    for name in names:
        p = MemoryPlan(DEVICE_MEMORY[name], a.kv_memory_fraction, weights, temp, kv, a.page_size)
        ok = p.budget > 0 and p.kv_tokens >= a.max_model_len
        print(f"{name:>7} {p.device_memory / 1e9:7.0f} {weights / 1e9:11.2f} {temp / 1e9:8.2f} "
              f"{max(p.budget, 0) / 1e9:13.2f} {p.kv_tokens:14d} {p.kv_tokens * ranks:12d} "
              f"{p.kv_tokens // a.max_model_len * ranks:12d}  {'yes' if ok else 'NO'}")
        out.append(p)
        if a.dynamo and ok:
            reg = dynamo_registration(page_size=a.page_size, pages=p.num_pages * ranks, max_model_len=a.max_model_len,
                                      max_seqs=auto_max_batch(p.num_pages, a.page_size, "gpu", ranks),
                                      prefill_tokens=max(DEFAULT_PREFILL_TOKENS, a.prefill_chunk))
            print("dynamo registration " + json.dumps({"model": a.model, "device": name, "mesh": a.mesh,
                                                       "attention_ranks": ranks, **reg}))
    return out


def compile_temps(cfg, a, mesh, rules, quant) -> dict[str, int]:
    """memory_analysis temp bytes of the largest decode and prefill executables, compiled for fake devices."""
    c = cfg if not a.layers else cfg.replace(num_hidden_layers=a.layers,
                                             first_k_dense_replace=min(cfg.first_k_dense_replace, a.layers - 1))
    model = checkpoints.abstract_model(c, dtype=jnp.float32, quant=quant, fp8_linears=a.quant != "bf16", mesh=mesh,
                                       rules=rules, runtime=Runtime(matmul_impl="pallas_interpret"))
    ec = EngineConfig(page_size=a.page_size, num_pages=8 * (a.max_model_len // a.page_size) + 1,
                      max_model_len=a.max_model_len, prefill_buckets=(a.prefill_chunk,),
                      decode_buckets=(a.decode_batch,), decode_steps=1, decode_windows=(a.max_model_len // a.page_size,))
    roles = {"decode"} if a.pool == "decode" else {"prefill"}
    eng = Engine(model, ec, mesh=mesh, roles=roles, compile=False)
    out = {}
    for key, low in eng.lowered().items():
        exe = low.compile()
        out["/".join(map(str, key))] = int(exe.memory_analysis().temp_size_in_bytes)
        print(f"compiled {key}: temp {out['/'.join(map(str, key))] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    main()
