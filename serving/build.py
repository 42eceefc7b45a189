"""The one builder of engines: checkpoint (or a given model) -> weights placed on a mesh -> a sized, compiled
`Engine`. `LLM` and the worker processes both build through it, so an engine means the same thing everywhere."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import checkpoints
from model.deepseek import DeepseekV3
from model.runtime import GPU_PLATFORMS, Runtime
from serving.config import (AUTO_BATCH_CAP, DEFAULT_AUTO_BATCH_CAP, DEFAULT_KV_MEMORY_FRACTION, EngineConfig,
                            default_dtype)
from serving.engine import Engine
from sharding.plan import MemoryPlan, device_memory_of, kv_bytes_per_token, weight_bytes_per_device
from sharding.plan import plan as memory_plan
from sharding import AxisRules, eplb, place

log = logging.getLogger(__name__)


def size_cache(model: DeepseekV3, cfg: EngineConfig, *, mesh: Mesh | None, roles, kv_memory_fraction: float,
               device_memory: float | None = None) -> tuple[EngineConfig, MemoryPlan]:
    """`cfg` with `num_pages` sized from a device-memory budget (like vLLM's `gpu_memory_utilization`):
    fraction x device memory - the placed weights - the largest prefill/decode executable's temporaries (compiled
    once here, on a one-sequence cache, for their `memory_analysis`) = the KV budget. Raises `MemoryPlanError`
    naming what to change when not even one `max_model_len` sequence fits."""
    device = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0])
    device_memory = device_memory or device_memory_of(device)
    if device_memory is None:
        raise ValueError(f"kv_memory_fraction needs the device memory, and {device.platform} devices do not report "
                         "it: pass device_memory (bytes; --device_memory_gb) or a fixed num_pages")
    # auto decode buckets: probe at the platform's cap (the engine sizes its batch from the pool found here)
    platform = model.runtime.platform or device.platform
    largest = (cfg.decode_buckets[-1] if cfg.decode_buckets is not None else
               AUTO_BATCH_CAP.get(platform, DEFAULT_AUTO_BATCH_CAP))
    probe = dataclasses.replace(cfg, num_pages=cfg.pages_per_seq + 1, prefill_buckets=cfg.prefill_buckets[-1:],
                                decode_buckets=(largest,), decode_windows=(cfg.pages_per_seq,))
    eng = Engine(model, probe, mesh=mesh, roles=set(roles) & {"prefill", "decode"} or {"decode"}, name="probe",
                 compile=False)
    temp = max((low.compile().memory_analysis().temp_size_in_bytes for low in eng.lowered().values()), default=0)
    del eng
    p = memory_plan(device_memory, weight_bytes_per_device(model), kv_bytes_per_token(model.cfg, cfg.cache_dtype or
                                                                                      model.dtype),
                    fraction=kv_memory_fraction, temp=temp, page_size=cfg.page_size, min_tokens=cfg.max_model_len)
    log.info("KV cache sized from %.0f%% of %.1f GB: weights %.2f GB, temporaries %.2f GB -> %d pages (%d tokens)",
             100 * kv_memory_fraction, device_memory / 1e9, p.weights / 1e9, p.temp / 1e9, p.num_pages, p.kv_tokens)
    return dataclasses.replace(cfg, num_pages=p.num_pages + 1), p   # + the scratch page


def mesh_platform(mesh: Mesh | None) -> str:
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
    onto it). `kv_memory_fraction` sizes `num_pages` from the device memory left after weights and temporaries (on
    GPUs with num_pages=None: 0.9 by default; elsewhere None leaves the engine to a host budget)."""
    if (checkpoint is None) == (model is None):
        raise ValueError("build_engine needs exactly one of checkpoint= or model=")
    R = cfg.redundant_experts
    if model is not None:
        if R and model.cfg.n_redundant_experts not in (0, R):
            raise ValueError(f"redundant_experts={R} but the model has {model.cfg.n_redundant_experts}")
        m = place(eplb.expand(model, R) if R and not model.cfg.n_redundant_experts else model, mesh, rules,
                  runtime=runtime)
    else:
        m = checkpoints.load(checkpoint, mesh=mesh, rules=rules, dtype=resolve_dtype(dtype, mesh, name=name),
                             quant=quant, runtime=runtime, progress=progress, redundant_experts=R)
    if kv_memory_fraction is None and cfg.num_pages is None and mesh_platform(mesh) in GPU_PLATFORMS:
        kv_memory_fraction = DEFAULT_KV_MEMORY_FRACTION   # GPUs report their memory: fill it (CPU: a host budget)
    if kv_memory_fraction is not None:
        cfg, _ = size_cache(m, cfg, mesh=mesh, roles=roles, kv_memory_fraction=kv_memory_fraction,
                            device_memory=device_memory_gb * 1e9 if device_memory_gb else None)
    return Engine(m, cfg, mesh=mesh, name=name, roles=roles, compile=compile)
