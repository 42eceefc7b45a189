"""What moved between the jax versions Tandem runs on (0.10.2 on CI, 0.11.x on the GPU machines), in one place.

- Lowering a Pallas Triton kernel for cuda on a host without a GPU: jax 0.10 falls back to compute capability 9.0
  by itself; jax 0.11 asks the default device for its GPU info and fails on a CPU host unless an abstract GPU mesh
  is in context -- which a program sharded over a concrete (fake CPU) mesh cannot use (its shard_maps and input
  shardings name the CPU mesh). `cuda_lowering()` gives jax 0.11's lowering the H100's GPU info for the duration
  instead: the same target jax 0.10 assumes. A no-op on a GPU host and on jax 0.10.
"""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def cuda_lowering(platform: str = "cuda"):
    """Context for lowering / exporting Pallas Triton kernels for `platform` on a host without a GPU (sm_90 target
    for cuda; a no-op for any other platform)."""
    if platform not in ("cuda", "gpu") or jax.default_backend() == "gpu":
        yield
        return
    from jax._src.pallas.triton import pallas_call_registration as reg

    gi = getattr(reg, "gpu_info_lib", None)      # jax >= 0.11; jax 0.10 has its own sm_90 fallback
    if gi is None:
        yield
        return
    original = gi.get_gpu_info
    gi.get_gpu_info = lambda: gi.get_gpu_info_from_version(gi.GpuVersion.H100)
    try:
        yield
    finally:
        gi.get_gpu_info = original


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for the cuda platform (works on a CPU-only machine)."""
    with cuda_lowering():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


__all__ = ["cuda_lowering", "lower_for_cuda"]
