"""The one builder of engines: checkpoint (or a given model) -> weights placed on a mesh -> a sized, compiled
`Engine`. `LLM` and the worker processes both build through it, so an engine means the same thing everywhere."""

from __future__ import annotations

import logging

import jax.numpy as jnp
from jax.sharding import Mesh

import checkpoints
from model.deepseek import DeepseekV3
from model.runtime import Runtime
from serving.config import EngineConfig, default_dtype
from serving.engine import Engine, size_cache
from sharding import AxisRules, place

log = logging.getLogger(__name__)


def mesh_platform(mesh: Mesh | None) -> str:
    import jax

    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def resolve_dtype(dtype, mesh: Mesh | None, *, name: str = "engine") -> jnp.dtype:
    """The weight dtype asked for, or the platform's default (logged, with the reason)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    platform = mesh_platform(mesh)
    d = jnp.dtype(default_dtype(platform))
    log.info("%s: weights in %s (the %s default; --dtype / LLM(dtype=...) to change)", name, d.name, platform)
    return d


def build_engine(cfg: EngineConfig, *, mesh: Mesh | None, rules: AxisRules, name: str, roles,
                 checkpoint: str | None = None, model: DeepseekV3 | None = None, dtype=None, quant: str | None = None,
                 runtime: Runtime | None = None, kv_memory_fraction: float | None = None,
                 device_memory_gb: float | None = None, compile: bool = True, progress: bool = False) -> Engine:
    """An engine on `mesh` from `checkpoint` (loaded straight onto the mesh, shard by shard) or from `model` (placed
    onto it). `kv_memory_fraction` sizes `num_pages` from the device memory left after weights and temporaries."""
    if (checkpoint is None) == (model is None):
        raise ValueError("build_engine needs exactly one of checkpoint= or model=")
    if model is not None:
        m = place(model, mesh, rules, runtime=runtime)
    else:
        m = checkpoints.load(checkpoint, mesh=mesh, rules=rules, dtype=resolve_dtype(dtype, mesh, name=name),
                             quant=quant, runtime=runtime, progress=progress)
    if kv_memory_fraction is not None:
        cfg, _ = size_cache(m, cfg, mesh=mesh, roles=roles, kv_memory_fraction=kv_memory_fraction,
                            device_memory=device_memory_gb * 1e9 if device_memory_gb else None)
    return Engine(m, cfg, mesh=mesh, name=name, roles=roles, compile=compile)
