"""How the model runs: its logical-axis vocabulary and the `Runtime` (kernel choices, expert parallelism).

The model owns both. `sharding/` maps the logical axes to mesh axes (rule sets as data) and builds the `Runtime`
for a mesh (`sharding.place` / `checkpoints.load(mesh=...)`), but layers never import `sharding`.

A `Runtime` is a frozen, hashable value stored on `DeepseekV3.runtime`; it travels in the nnx graphdef (static),
so a compiled step is specialised to it, and `forward` hands it to every layer. Kernel choice is decided from the
*target* platform (`platform`), not from the host's backend, so a CPU host that exports for cuda embeds the GPU
kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

# Logical axes of weights (declared once, in `model.layers.param(..., axes=...)`) and of activations (token
# batches, caches, shard_map specs). Every rule set in `sharding/` must map each of them.
WEIGHT_AXES = frozenset({"vocab", "embed", "heads", "qk_head", "kv_head", "v_head", "q_lora", "kv_lora",
                         "kv_latent", "qkv_a", "mlp", "experts", "expert_mlp"})
# "pages": the physical page axis of the paged KV cache (split = data-parallel attention: each rank owns pages).
ACTIVATION_AXES = frozenset({"batch", "seq", "pages"})
LOGICAL_AXES = WEIGHT_AXES | ACTIVATION_AXES

MatmulImpl = Literal["xla", "pallas", "pallas_interpret"]
MATMUL_IMPLS = ("xla", "pallas", "pallas_interpret")
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Execution choices of one placed model.

    matmul_impl: quantized (FP4/FP8) matmuls — "xla" (dequantize + dot), "pallas" (Triton kernels, GPU),
        "pallas_interpret" (the same kernels in the Pallas interpreter, any platform; tests). None: by platform.
    attention_impl: paged decode attention — "xla" (gather the page window, masked softmax), "pallas" (the paged
        MLA kernel, `pallas_kernels.paged_attention`: reads pages through the page table), "pallas_interpret".
        None: by platform.
    prefill_attention: "blockwise" (key blocks of `prefill_block` tokens read from the pages, only as many as the
        chunk reaches, online softmax: O(T x block) memory, work ~ the context present) or "window" (gather the
        whole page window of the executable, O(T x S) scores: the first version, kept as a reference).
    decode_attention: XLA decode attention (no paged kernel) — "blockwise" (absorbed attention over key blocks of
        `decode_block` tokens, only as many as the rows reach: a step costs the live context) or "window" (gather
        the executable's whole page window: cost follows the window, kept as a reference).
    platform: the platform the model is compiled for ("cpu", "cuda", ...). None: the devices' platform at trace
        time. Set it when lowering/exporting for another platform than the host's.
    moe_impl: routed-expert computation, see `model.moe.MOE_IMPLS`. None: chosen per shape (`model.moe.choose`).
    expert_parallel: the expert-parallel dispatch over a mesh (`model.expert_parallel.ExpertParallel`), or None
        for local experts.
    mesh, rules: the mesh the weights are placed on and the rule set that placed them (anything with
        `.spec(logical_axes, mesh) -> PartitionSpec`, e.g. `sharding.AxisRules`). Quantized matmuls run their
        kernels inside `shard_map` over the weights' local shards (a custom call has no partitioning rule: under
        plain GSPMD its weight would be all-gathered).
    """

    matmul_impl: MatmulImpl | None = None
    attention_impl: MatmulImpl | None = None
    prefill_attention: str = "blockwise"
    prefill_block: int = 256
    decode_attention: str = "blockwise"
    decode_block: int = 128
    platform: str | None = None
    moe_impl: str | None = None
    expert_parallel: object | None = None
    mesh: object | None = None
    rules: object | None = None

    def __post_init__(self):
        if self.prefill_attention not in ("blockwise", "window"):
            raise ValueError(f"prefill_attention={self.prefill_attention!r}: expected 'blockwise' or 'window'")
        if self.decode_attention not in ("blockwise", "window"):
            raise ValueError(f"decode_attention={self.decode_attention!r}: expected 'blockwise' or 'window'")
        if self.prefill_block < 1 or self.decode_block < 1:
            raise ValueError(f"prefill_block={self.prefill_block} / decode_block={self.decode_block} must be >= 1")
        for f in ("matmul_impl", "attention_impl"):
            if getattr(self, f) is not None and getattr(self, f) not in MATMUL_IMPLS:
                raise ValueError(f"{f}={getattr(self, f)!r}: expected one of {MATMUL_IMPLS} or None")

    @property
    def target_platform(self) -> str:
        return self.platform or jax.default_backend()

    def resolved_matmul_impl(self) -> str:
        """The quantized-matmul implementation: the explicit choice, else Pallas on GPU and XLA elsewhere."""
        if self.matmul_impl is not None:
            if self.matmul_impl == "pallas" and self.target_platform not in GPU_PLATFORMS:
                raise ValueError(f"matmul_impl='pallas' needs a GPU target, but the platform is "
                                 f"{self.target_platform!r}; use 'pallas_interpret' (the same kernels in the "
                                 "Pallas interpreter) or 'xla', or set Runtime.platform='cuda' when exporting")
            return self.matmul_impl
        return "pallas" if self.target_platform in GPU_PLATFORMS else "xla"

    def spec(self, axes):
        """The PartitionSpec of logical `axes` on this runtime's mesh (None without a mesh)."""
        if self.mesh is None or self.rules is None or axes is None:
            return None
        return self.rules.spec(tuple(axes), self.mesh)

    def resolved_attention_impl(self) -> str:
        impl = self.attention_impl
        if impl is None:
            return "pallas" if self.target_platform in GPU_PLATFORMS else "xla"
        if impl == "pallas" and self.target_platform not in GPU_PLATFORMS:
            raise ValueError(f"attention_impl='pallas' needs a GPU target, but the platform is "
                             f"{self.target_platform!r}; use 'pallas_interpret' or 'xla'")
        return impl

    def replace(self, **kw) -> "Runtime":
        return dataclasses.replace(self, **kw)


DEFAULT_RUNTIME = Runtime()


def platform_dtype(platform: str):
    """The weight/compute dtype a model gets when none is asked for, by target platform: float32 on CPU (XLA:CPU
    upcasts bf16 dots per op and runs them ~2x slower than f32; f32 also keeps results independent of the mesh),
    bfloat16 on accelerators."""
    return jnp.float32 if platform == "cpu" else jnp.bfloat16
