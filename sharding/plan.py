"""Memory plan: what one device of a mesh holds (weights, KV cache, executable temporaries) before anything is
allocated, and how many KV pages fit a device-memory budget.

    python -m sharding.plan --model deepseek-v3 --quant fp8 --mesh ep=8 [--topology hgx-h200] [--compile]

Weights come from the abstract model (`checkpoints.abstract_model`: the representation each weight would load as
— bf16, block-FP8 `Fp8Tensor`, FP4 `QuantizedTensor` — and its sharding on the mesh), summed per device from the
shard shapes. The KV cache costs `(layers + MTP layers) x (kv_lora_rank + qk_rope_head_dim) x dtype bytes` per
token per device holding it (the latent cache is replicated over a mesh today). Temporaries are XLA's
`memory_analysis().temp_size_in_bytes` of the compiled prefill and decode executables (`--compile`: lowered and
compiled for fake CPU devices of the mesh's shape, with the quantized weights and the Pallas kernels run by the
interpreter — the GPU's algorithm, tile by tile — and f32 activations). Two XLA:CPU artefacts are avoided that
way: its `ragged_dot` lowering expands every expert group densely (36 GB of temporaries for one V3 MoE layer at a
512-token prefill chunk), and bf16 dots get hoisted f32 copies of their weights. What remains is XLA:CPU's buffer
assignment of the real graph, which keeps some per-layer buffers alive across the 61 unrolled layers: an upper
bound for planning, not the GPU's own figure.

KV budget per device = fraction x device memory - weights - temporaries; pages = budget // page bytes. A plan that
does not fit raises `MemoryPlanError` naming what to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

# Device memory of the accelerators we plan for (decimal GB as the vendors quote them).
DEVICE_MEMORY = {"h100": 80e9, "h200": 141e9, "b200": 192e9}
TOPOLOGY_DEVICE = {"h100-8": "h100", "hgx-h200": "h200", "hgx-b200": "b200", "gb200-nvl72": "b200"}


class MemoryPlanError(ValueError):
    """The weights (and temporaries) do not leave room for a KV cache within the budget."""


def _leaf_bytes(leaf) -> int:
    sh = getattr(leaf, "sharding", None)
    shape = tuple(leaf.shape)
    if sh is not None and hasattr(sh, "shard_shape"):
        shape = sh.shard_shape(shape)
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


def weight_bytes_per_device(model) -> int:
    """Bytes of weights one device holds (every leaf's shard; replicated leaves count in full)."""
    from flax import nnx

    _, state = nnx.split(model)
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(state))


def kv_bytes_per_token(cfg, cache_dtype=jnp.bfloat16) -> int:
    """Latent cache bytes per token (all layers, MTP's included) on a device that holds it; "fp8" = e4m3 codes +
    a 4-byte per-token scale."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if cache_dtype == "fp8":
        return layers * (cfg.cache_width + 4)
    return layers * cfg.cache_width * jnp.dtype(cache_dtype).itemsize


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    device_memory: float          # bytes per device
    fraction: float               # of it the engine may use
    weights: int                  # bytes per device
    temp: int                     # executables' temporaries per device (max over executables)
    kv_per_token: int             # bytes per token per device holding it
    page_size: int
    kv_shards: int = 1            # devices a token's cache is split over (1: replicated)

    @property
    def budget(self) -> float:
        return self.fraction * self.device_memory - self.weights - self.temp

    @property
    def page_bytes(self) -> int:
        return -(-self.kv_per_token * self.page_size // self.kv_shards)

    @property
    def num_pages(self) -> int:
        return max(0, int(self.budget // self.page_bytes))

    @property
    def kv_tokens(self) -> int:
        return self.num_pages * self.page_size

    def check(self, min_tokens: int = 0) -> "MemoryPlan":
        if self.budget <= 0 or self.kv_tokens < max(min_tokens, self.page_size):
            raise MemoryPlanError(
                f"does not fit: {self.fraction:.0%} of {self.device_memory / 1e9:.0f} GB per device = "
                f"{self.fraction * self.device_memory / 1e9:.1f} GB, weights take {self.weights / 1e9:.1f} GB and "
                f"temporaries {self.temp / 1e9:.1f} GB, leaving {max(self.budget, 0) / 1e9:.2f} GB for the KV cache "
                f"({self.kv_tokens} tokens; {max(min_tokens, self.page_size)} needed). Use more devices per mesh "
                "(split the experts over a larger ep, attention over tp), a smaller weight format (--quant fp8 / "
                "nvfp4), a smaller max_model_len, or a larger memory fraction")
        return self


def plan(device_memory: float, weights: int, kv_per_token: int, *, fraction: float = 0.9, temp: int = 0,
         page_size: int = 64, kv_shards: int = 1, min_tokens: int = 0) -> MemoryPlan:
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_memory_fraction={fraction} must be in (0, 1]")
    return MemoryPlan(device_memory, fraction, int(weights), int(temp), int(kv_per_token), page_size,
                      kv_shards).check(min_tokens)


def device_memory_of(device) -> float | None:
    """The memory a device reports (GPU/TPU `memory_stats()['bytes_limit']`); None where it reports none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ---- CLI ---------------------------------------------------------------------------------------------------------
def _args(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-v3", help="a preset (deepseek-v3, deepseek-r1, tiny) or an HF "
                    "checkpoint directory (its config.json)")
    ap.add_argument("--quant", default="fp8", choices=["bf16", "fp8", "nvfp4", "mxfp4", "nvfp4+dense"],
                    help="weights: bf16; fp8 = DeepSeek's block FP8 for every decoder linear; nvfp4 / mxfp4 = "
                    "FP4 routed experts + FP8 for the other linears")
    ap.add_argument("--mesh", default="ep=8", help="mesh of one engine, e.g. ep=8, dp=2,ep=4, tp=8")
    ap.add_argument("--pool", default="decode", choices=["decode", "prefill"], help="which rule set places it")
    ap.add_argument("--topology", default="all", help="hgx-h200 | h100-8 | hgx-b200 | gb200-nvl72 | all")
    ap.add_argument("--kv_memory_fraction", type=float, default=0.9)
    ap.add_argument("--page_size", type=int, default=64)
    ap.add_argument("--max_model_len", type=int, default=32768)
    ap.add_argument("--cache_dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="lower and compile the largest decode and prefill "
                    "executables on fake CPU devices for their temporaries (real dims: minutes)")
    ap.add_argument("--decode_batch", type=int, default=64, help="decode batch bucket compiled with --compile")
    ap.add_argument("--prefill_chunk", type=int, default=512, help="prefill chunk compiled with --compile")
    ap.add_argument("--layers", type=int, default=0, help="--compile on a model cut to this many layers and the "
                    "temporaries of the full depth taken as equal (they are per-step buffers, reused per layer); "
                    "0 = all layers")
    return ap.parse_args(argv)


def main(argv=None) -> list[MemoryPlan]:
    a = _args(argv)
    # The CLI sits on top of the stack (it builds engines); serving imports this module, so these stay lazy.
    from serving.api import parse_mesh_spec

    mesh_shape = parse_mesh_spec(a.mesh)
    n = math.prod(mesh_shape.values())
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", max(n, 1))   # fake devices of the mesh's shape (CPU)
    import checkpoints
    from model.config import ModelConfig, preset, presets
    from sharding.rules import DECODE_RULES, PREFILL_RULES
    from sharding.topology import Topology

    cfg = preset(a.model) if a.model in presets() else ModelConfig.from_hf(a.model)
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
    return out


def compile_temps(cfg, a, mesh, rules, quant) -> dict[str, int]:
    """memory_analysis temp bytes of the largest decode and prefill executables, compiled for fake devices."""
    import checkpoints
    from serving.engine import Engine, EngineConfig

    c = cfg if not a.layers else cfg.replace(num_hidden_layers=a.layers,
                                             first_k_dense_replace=min(cfg.first_k_dense_replace, a.layers - 1))
    from model.runtime import Runtime

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
