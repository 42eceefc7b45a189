"""Memory plan: what one device of a mesh holds (weights, KV cache, executable temporaries) before anything is
allocated, and how many KV pages fit a device-memory budget.

The command line that prints a plan for a preset (`python -m planner.memory`) sits above serving (it compiles
engines for `--compile`); this module is the arithmetic, which serving uses to size its cache.

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
