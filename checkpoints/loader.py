"""HF DeepSeek-V3/R1 safetensors -> a ready `model.DeepseekV3`, tensor by tensor.

The model is first built abstractly (`nnx.eval_shape`: shapes, dtypes and logical axes, no memory). Each weight
then has a *plan*: which checkpoint tensors it is made of and how (transpose to [in, out], split heads, stack
experts, dequantize block-fp8). Every tensor is read from its memory map, converted, checked against the declared
shape and placed straight onto its device(s) before the next one is read, so host memory holds about one tensor
at a time. Every checkpoint tensor must be consumed by some plan: leftovers are reported as unexpected.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from checkpoints.safetensors_io import Checkpoint, CheckpointError, dtype_name
from model.config import ModelConfig
from model.deepseek import DeepseekV3

log = logging.getLogger(__name__)

_FLOAT_SOURCES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                  np.dtype(ml_dtypes.float8_e4m3fn)}


@dataclasses.dataclass(frozen=True)
class _Plan:
    sources: tuple[str, ...]                         # checkpoint tensor names
    build: Callable[[list[np.ndarray]], np.ndarray]  # float32 sources -> the weight in Tandem's layout


def _t(x):  # HF Linear [out, in] -> [in, out]
    return x[0].T


def _heads(*shape):
    return lambda x: x[0].T.reshape(shape)


def _stack_t(xs):  # E tensors [out, in] -> [E, in, out]
    return np.stack([x.T for x in xs])


def _attn_plans(prefix: str, cfg: ModelConfig) -> dict[str, _Plan]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    K, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    a = prefix + "self_attn."
    p = {}
    if cfg.q_lora_rank:
        p["self_attn.q_a_proj"] = _Plan((a + "q_a_proj.weight",), _t)
        p["self_attn.q_a_layernorm.weight"] = _Plan((a + "q_a_layernorm.weight",), lambda x: x[0])
        p["self_attn.q_b_proj"] = _Plan((a + "q_b_proj.weight",), _heads(cfg.q_lora_rank, H, K + R))
    else:
        p["self_attn.q_proj"] = _Plan((a + "q_proj.weight",), _heads(D, H, K + R))
    p["self_attn.kv_a_proj_with_mqa"] = _Plan((a + "kv_a_proj_with_mqa.weight",), _t)
    p["self_attn.kv_a_layernorm.weight"] = _Plan((a + "kv_a_layernorm.weight",), lambda x: x[0])
    p["self_attn.kv_b_proj"] = _Plan((a + "kv_b_proj.weight",), _heads(L, H, K + V))
    p["self_attn.o_proj"] = _Plan((a + "o_proj.weight",), lambda x: x[0].T.reshape(H, V, D))
    return p


def _mlp_plans(hf: str, ours: str) -> dict[str, _Plan]:
    return {f"{ours}.{n}": _Plan((f"{hf}.{n}.weight",), _t) for n in ("gate_proj", "up_proj", "down_proj")}


def _layer_plans(hf_prefix: str, cfg: ModelConfig, moe: bool, ckpt: Checkpoint) -> dict[str, _Plan]:
    p = _attn_plans(hf_prefix, cfg)
    for n in ("input_layernorm", "post_attention_layernorm"):
        p[f"{n}.weight"] = _Plan((f"{hf_prefix}{n}.weight",), lambda x: x[0])
    m = hf_prefix + "mlp."
    if not moe:
        p.update(_mlp_plans(m[:-1], "mlp"))
        return p
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    p["mlp.gate"] = _Plan((m + "gate.weight",), _t)
    p["mlp.e_score_correction_bias"] = _Plan((m + "gate.e_score_correction_bias",), lambda x: x[0])
    if m + "experts.gate_up_proj" in ckpt:  # transformers' in-memory fused layout, if someone saved that
        p["mlp.experts_gate_proj"] = _Plan((m + "experts.gate_up_proj",), lambda x: x[0][:, :F].transpose(0, 2, 1))
        p["mlp.experts_up_proj"] = _Plan((m + "experts.gate_up_proj",), lambda x: x[0][:, F:].transpose(0, 2, 1))
        p["mlp.experts_down_proj"] = _Plan((m + "experts.down_proj",), lambda x: x[0].transpose(0, 2, 1))
    else:
        for n in ("gate_proj", "up_proj", "down_proj"):
            p[f"mlp.experts_{n}"] = _Plan(tuple(f"{m}experts.{e}.{n}.weight" for e in range(E)), _stack_t)
    if cfg.n_shared_experts:
        p.update(_mlp_plans(m + "shared_experts", "mlp.shared_experts"))
    return p


def plans(cfg: ModelConfig, ckpt: Checkpoint) -> dict[str, _Plan]:
    """Tandem parameter path ('layers.0.self_attn.o_proj') -> how to build it from the checkpoint."""
    p = {"embed_tokens": _Plan(("model.embed_tokens.weight",), lambda x: x[0]),
         "norm.weight": _Plan(("model.norm.weight",), lambda x: x[0])}
    if not cfg.tie_word_embeddings:
        p["lm_head"] = _Plan(("lm_head.weight",), _t)
    for i in range(cfg.num_hidden_layers):
        for k, v in _layer_plans(f"model.layers.{i}.", cfg, cfg.is_moe_layer(i), ckpt).items():
            p[f"layers.{i}.{k}"] = v
    for d in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + d}."
        for k, v in _layer_plans(hf, cfg, cfg.is_moe_layer(cfg.num_hidden_layers), ckpt).items():
            p[f"mtp.{d}.block.{k}"] = v
        p[f"mtp.{d}.enorm.weight"] = _Plan((hf + "enorm.weight",), lambda x: x[0])
        p[f"mtp.{d}.hnorm.weight"] = _Plan((hf + "hnorm.weight",), lambda x: x[0])
        p[f"mtp.{d}.eh_proj"] = _Plan((hf + "eh_proj.weight",), _t)
        p[f"mtp.{d}.shared_head_norm.weight"] = _Plan((hf + "shared_head.norm.weight",), lambda x: x[0])
    return p


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """Per-MTP-layer copies of the shared embedding/head that DeepSeek's release stores: name -> main tensor."""
    out = {}
    for d in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + d}."
        out[hf + "embed_tokens.weight"] = "model.embed_tokens.weight"
        out[hf + "shared_head.head.weight"] = "lm_head.weight"
    return out


def _block_size(path: str) -> tuple[int, int]:
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            q = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        q = {}
    b = q.get("weight_block_size", [128, 128])
    return int(b[0]), int(b[1])


def dequantize_block_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str) -> np.ndarray:
    """DeepSeek block-fp8: w_f32[i, j] = w_fp8[i, j] * scale_inv[i // bo, j // bi]."""
    bo, bi = block
    out, inn = w.shape
    want = (-(-out // bo), -(-inn // bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"tensor {name!r}: weight_scale_inv has shape {list(scale_inv.shape)}, expected "
                              f"{list(want)} for a {list(w.shape)} weight in {bo}x{bi} blocks")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, axis=0), bi, axis=1)[:out, :inn]
    return w.astype(np.float32) * s


def _read(ckpt: Checkpoint, name: str, block: tuple[int, int]) -> np.ndarray:
    if name not in ckpt:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint at {ckpt.path}")
    dt = ckpt.dtype(name)
    if dt not in _FLOAT_SOURCES:
        raise CheckpointError(f"tensor {name!r} in {ckpt.file_of(name)} has dtype {dtype_name(dt)}; expected a "
                              f"float weight (F32, F16, BF16 or F8_E4M3 with weight_scale_inv)")
    w = ckpt.get(name)
    if dt == np.dtype(ml_dtypes.float8_e4m3fn):
        sname = name[: -len("weight")] + "weight_scale_inv"
        if sname not in ckpt:
            raise CheckpointError(f"tensor {name!r} in {ckpt.file_of(name)} is float8 but {sname!r} is missing")
        return dequantize_block_fp8(w, ckpt.get(sname), block, name)
    return w.astype(np.float32)


def _default_dtype(ckpt: Checkpoint):
    dt = ckpt.dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in ckpt else np.float32
    return jnp.float32 if np.dtype(dt) == np.float32 else jnp.bfloat16


def load(path: str | os.PathLike, *, dtype=None, mesh=None, rules=None, quant: str | None = None) -> DeepseekV3:
    """Load an HF DeepSeek-V3/R1 checkpoint directory into a `DeepseekV3` model.

    dtype: compute/storage dtype of the weights (default: float32 for f32 checkpoints, else bfloat16; block-fp8
    weights are dequantized on load). The router and its correction bias always stay float32. The MTP module is
    loaded when the checkpoint has `model.layers.{num_hidden_layers}.*`; otherwise the model has none.
    `mesh`/`rules` place each weight onto its sharding as it is read (see `sharding.rules`).
    """
    path = os.fspath(path)
    if quant is not None:
        raise ValueError(f"quant={quant!r}: FP4 quantization on load is not available yet (no quantizer in this "
                         "build); load without quant")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    ckpt = Checkpoint(path)
    n_mtp = 0
    while any(k.startswith(f"model.layers.{cfg.num_hidden_layers + n_mtp}.") for k in ckpt.keys()):
        n_mtp += 1
    if n_mtp != cfg.num_nextn_predict_layers:
        log.info("checkpoint has %d MTP layer(s) (config says %d); loading %d", n_mtp,
                 cfg.num_nextn_predict_layers, n_mtp)
        cfg = cfg.replace(num_nextn_predict_layers=n_mtp)
    dtype = jnp.dtype(dtype) if dtype is not None else _default_dtype(ckpt)
    block = _block_size(path)

    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    plan = plans(cfg, ckpt)
    ours = {".".join(map(str, k)): k for k in flat}
    if set(ours) != set(plan):  # a bug in this file, not in the checkpoint
        raise AssertionError(f"loader plan and model differ: {sorted(set(ours) ^ set(plan))}")

    needed = {s for p in plan.values() for s in p.sources}
    missing = sorted(needed - set(ckpt.keys()))
    if missing:
        raise CheckpointError(f"checkpoint at {path} is missing {len(missing)} tensor(s): "
                              + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    copies = _mtp_copies(cfg)
    scales = {k for k in ckpt.keys() if k.endswith(".weight_scale_inv")}
    unexpected = sorted(set(ckpt.keys()) - needed - set(copies) - scales)
    if unexpected:
        raise CheckpointError(f"checkpoint at {path} has {len(unexpected)} unexpected tensor(s) for this config, "
                              f"e.g. {unexpected[0]!r} in {ckpt.file_of(unexpected[0])}: "
                              + ", ".join(unexpected[:8]))
    for copy, main in copies.items():  # stored duplicates must really be the shared weights
        if copy in ckpt and main in ckpt:
            a, b = ckpt.get_rows(copy, 8).astype(np.float32), ckpt.get_rows(main, 8).astype(np.float32)
            if a.shape != b.shape or not np.array_equal(a, b):
                raise CheckpointError(f"tensor {copy!r} differs from {main!r}: Tandem's MTP shares the main "
                                      "model's embedding and head")

    place = _placer(mesh, rules)
    for key, var in flat.items():
        name = ".".join(map(str, key))
        p = plan[name]
        arr = p.build([_read(ckpt, s, block) for s in p.sources])
        want = tuple(var.value.shape)
        if arr.shape != want:
            src = p.sources[0]
            raise CheckpointError(f"tensor {src!r} in {ckpt.file_of(src)} has shape {list(ckpt.shape(src))}, "
                                  f"which does not fit {name} {list(want)} for this config")
        var.value = place(arr.astype(var.value.dtype), var.get_metadata().get("axes"))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model


def _placer(mesh, rules):
    if mesh is None:
        return lambda arr, axes: jnp.asarray(arr)
    from sharding.rules import logical_sharding

    return lambda arr, axes: jax.device_put(arr, logical_sharding(axes, mesh, rules))
