"""HF DeepSeek-V3/R1 safetensors -> a ready `model.DeepseekV3`, tensor by tensor.

The model is first built abstractly (`nnx.eval_shape`: shapes, dtypes and logical axes, no memory). Each weight
then has a *plan*: which checkpoint tensors it is made of and how (transpose to [in, out], split heads, stack
experts, dequantize block-fp8). Every tensor is read from its memory map, converted, checked against the declared
shape and placed straight onto its device(s) before the next one is read, so host memory holds about one tensor
at a time. Every checkpoint tensor must be consumed by some plan: leftovers are reported as unexpected.

FP4 (`quant="nvfp4" | "mxfp4"`, optionally `"+dense"`): the routed-expert stacks (and with `+dense` the dense MLPs
and shared experts) are quantized one stack at a time as they are read, and kept packed (`QuantizedTensor`
values in the model's variables) on their devices. A checkpoint written by `python -m checkpoints.quantize` (or an
NVIDIA ModelOpt NVFP4 one: `weight` uint8 + `weight_scale` + `weight_scale_2`) loads its packed tensors as they
are, without re-quantizing; see docs/fp4.md ("Quantized checkpoints").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from checkpoints.safetensors_io import Checkpoint, CheckpointError, dtype_name
from model.config import ModelConfig
from model.deepseek import DeepseekV3
from model.runtime import Runtime
from pallas_kernels import formats
from pallas_kernels.formats import QuantizedTensor
from sharding.apply import runtime_for, variable_sharding

log = logging.getLogger(__name__)

_FLOAT_SOURCES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                  np.dtype(ml_dtypes.float8_e4m3fn)}


@dataclasses.dataclass(frozen=True)
class _Plan:
    sources: tuple[str, ...]                         # checkpoint tensor names
    build: Callable[[list[np.ndarray]], np.ndarray]  # float32 sources -> the weight in Tandem's layout


def linear_t(x):  # HF Linear [out, in] -> [in, out]
    return x[0].T


def _heads(*shape):
    return lambda x: x[0].T.reshape(shape)


def stack_experts_t(xs):  # E tensors [out, in] -> [E, in, out]
    return np.stack([x.T for x in xs])


def _attn_plans(prefix: str, cfg: ModelConfig) -> dict[str, _Plan]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    K, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    a = prefix + "self_attn."
    p = {}
    if cfg.q_lora_rank:
        p["self_attn.q_a_proj"] = _Plan((a + "q_a_proj.weight",), linear_t)
        p["self_attn.q_a_layernorm.weight"] = _Plan((a + "q_a_layernorm.weight",), lambda x: x[0])
        p["self_attn.q_b_proj"] = _Plan((a + "q_b_proj.weight",), _heads(cfg.q_lora_rank, H, K + R))
    else:
        p["self_attn.q_proj"] = _Plan((a + "q_proj.weight",), _heads(D, H, K + R))
    p["self_attn.kv_a_proj_with_mqa"] = _Plan((a + "kv_a_proj_with_mqa.weight",), linear_t)
    p["self_attn.kv_a_layernorm.weight"] = _Plan((a + "kv_a_layernorm.weight",), lambda x: x[0])
    p["self_attn.kv_b_proj"] = _Plan((a + "kv_b_proj.weight",), _heads(L, H, K + V))
    p["self_attn.o_proj"] = _Plan((a + "o_proj.weight",), lambda x: x[0].T.reshape(H, V, D))
    return p


def _mlp_plans(hf: str, ours: str) -> dict[str, _Plan]:
    return {f"{ours}.{n}": _Plan((f"{hf}.{n}.weight",), linear_t) for n in ("gate_proj", "up_proj", "down_proj")}


def _layer_plans(hf_prefix: str, cfg: ModelConfig, moe: bool, ckpt: Checkpoint) -> dict[str, _Plan]:
    p = _attn_plans(hf_prefix, cfg)
    for n in ("input_layernorm", "post_attention_layernorm"):
        p[f"{n}.weight"] = _Plan((f"{hf_prefix}{n}.weight",), lambda x: x[0])
    m = hf_prefix + "mlp."
    if not moe:
        p.update(_mlp_plans(m[:-1], "mlp"))
        return p
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    p["mlp.gate"] = _Plan((m + "gate.weight",), linear_t)
    p["mlp.e_score_correction_bias"] = _Plan((m + "gate.e_score_correction_bias",), lambda x: x[0])
    if m + "experts.gate_up_proj" in ckpt:  # transformers' in-memory fused layout, if someone saved that
        p["mlp.experts_gate_proj"] = _Plan((m + "experts.gate_up_proj",), lambda x: x[0][:, :F].transpose(0, 2, 1))
        p["mlp.experts_up_proj"] = _Plan((m + "experts.gate_up_proj",), lambda x: x[0][:, F:].transpose(0, 2, 1))
        p["mlp.experts_down_proj"] = _Plan((m + "experts.down_proj",), lambda x: x[0].transpose(0, 2, 1))
    else:
        for n in ("gate_proj", "up_proj", "down_proj"):
            p[f"mlp.experts_{n}"] = _Plan(tuple(f"{m}experts.{e}.{n}.weight" for e in range(E)), stack_experts_t)
    if cfg.n_shared_experts:
        p.update(_mlp_plans(m + "shared_experts", "mlp.shared_experts"))
    return p


def plans(cfg: ModelConfig, ckpt: Checkpoint) -> dict[str, _Plan]:
    """Tandem parameter path ('layers.0.self_attn.o_proj') -> how to build it from the checkpoint."""
    p = {"embed_tokens": _Plan(("model.embed_tokens.weight",), lambda x: x[0]),
         "norm.weight": _Plan(("model.norm.weight",), lambda x: x[0])}
    if not cfg.tie_word_embeddings:
        p["lm_head"] = _Plan(("lm_head.weight",), linear_t)
    for i in range(cfg.num_hidden_layers):
        for k, v in _layer_plans(f"model.layers.{i}.", cfg, cfg.is_moe_layer(i), ckpt).items():
            p[f"layers.{i}.{k}"] = v
    for d in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + d}."
        for k, v in _layer_plans(hf, cfg, cfg.is_moe_layer(cfg.num_hidden_layers), ckpt).items():
            p[f"mtp.{d}.block.{k}"] = v
        p[f"mtp.{d}.enorm.weight"] = _Plan((hf + "enorm.weight",), lambda x: x[0])
        p[f"mtp.{d}.hnorm.weight"] = _Plan((hf + "hnorm.weight",), lambda x: x[0])
        p[f"mtp.{d}.eh_proj"] = _Plan((hf + "eh_proj.weight",), linear_t)
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


def mtp_layers_present(cfg: ModelConfig, ckpt: Checkpoint) -> int:
    """How many MTP layers (`model.layers.{num_hidden_layers + d}.*`) the checkpoint really holds."""
    prefixes = {k.split(".")[2] for k in ckpt.keys() if k.startswith("model.layers.")}
    n = 0
    while str(cfg.num_hidden_layers + n) in prefixes:
        n += 1
    return n


def weight_block_size(path: str) -> tuple[int, int]:
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


# ---- FP4 ----------------------------------------------------------------------------------------------------------
QUANT_FORMATS = ("nvfp4", "mxfp4")
QUANT_CHOICES = (None, "nvfp4", "mxfp4", "nvfp4+dense", "mxfp4+dense")
QUANT_METHOD = "tandem_fp4"  # config.json quantization_config.quant_method of checkpoints.quantize's output
_EXPERT_TARGET = re.compile(r"(^|\.)mlp\.experts_(gate|up|down)_proj$")
_DENSE_TARGET = re.compile(r"(^|\.)mlp\.(shared_experts\.)?(gate|up|down)_proj$")


def parse_quant(quant: str | None) -> tuple[str | None, bool]:
    """`quant` -> (format or None, also quantize the dense MLPs and shared experts)."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant={quant!r} is not a supported quantization; expected one of "
                         f"{[q for q in QUANT_CHOICES if q]} (or None for the checkpoint's own weights): 'nvfp4' / "
                         "'mxfp4' quantize the routed experts, '+dense' also the dense MLPs and shared experts")
    if quant is None:
        return None, False
    fmt, _, extra = quant.partition("+")
    return fmt, extra == "dense"


def quantized_target(name: str, dense: bool) -> bool:
    """Whether Tandem parameter `name` ('layers.3.mlp.experts_gate_proj') is quantized under this option."""
    return bool(_EXPERT_TARGET.search(name) or (dense and _DENSE_TARGET.search(name)))


def _scale_names(weight_name: str) -> tuple[str, str]:
    base = weight_name[: -len("weight")]
    return base + "weight_scale", base + "weight_scale_2"


def _is_packed(ckpt: Checkpoint, name: str) -> bool:
    return name in ckpt and ckpt.dtype(name) == np.dtype(np.uint8) and _scale_names(name)[0] in ckpt


def _packed_format(ckpt: Checkpoint, name: str) -> str:
    sname = _scale_names(name)[0]
    dt = ckpt.dtype(sname)
    if dt == np.dtype(ml_dtypes.float8_e4m3fn):
        return "nvfp4"
    if dt == np.dtype(ml_dtypes.float8_e8m0fnu):
        return "mxfp4"
    raise CheckpointError(f"tensor {sname!r} in {ckpt.file_of(sname)} has dtype {dtype_name(dt)}; an FP4 block "
                          "scale must be F8_E4M3 (nvfp4) or F8_E8M0 (mxfp4)")


def read_packed(ckpt: Checkpoint, names: tuple[str, ...], shape: tuple[int, ...], stacked: bool) -> QuantizedTensor:
    """A QuantizedTensor of logical `shape` ([E, K, N] when `stacked`, else [K, N]) from FP4 checkpoint tensors in
    HF orientation: per name `weight` uint8 [N, Kp/2] (even K element in the low nibble), `weight_scale`
    [N, Kp/B] (e4m3: nvfp4, e8m0: mxfp4), `weight_scale_2` fp32 scalar (nvfp4; absent = 1). No re-quantization."""
    fmt = _packed_format(ckpt, names[0])
    B = formats.BLOCK_SIZE[fmt]
    K, N = shape[-2], shape[-1]
    Kp = -(-K // B) * B
    codes, scales, ts = [], [], []
    for n in names:
        sname, s2name = _scale_names(n)
        if _packed_format(ckpt, n) != fmt:
            raise CheckpointError(f"tensor {n!r}: FP4 format differs from {names[0]!r} ({fmt}) in the same stack")
        c, sc = ckpt.get(n), ckpt.get(sname)
        if c.shape != (N, Kp // 2) or sc.shape != (N, Kp // B):
            raise CheckpointError(f"FP4 tensor {n!r} in {ckpt.file_of(n)}: weight {list(c.shape)} / weight_scale "
                                  f"{list(sc.shape)}, expected [{N}, {Kp // 2}] / [{N}, {Kp // B}] ({fmt}) for a "
                                  f"[in={K}, out={N}] weight")
        t = ckpt.get(s2name).astype(np.float32) if s2name in ckpt else np.ones((), np.float32)
        if t.size != 1:
            raise CheckpointError(f"tensor {s2name!r} has shape {list(t.shape)}; expected one fp32 tensor scale")
        codes.append(c), scales.append(sc), ts.append(t.reshape(()))
    if stacked:
        c, sc, t = np.stack(codes), np.stack(scales), np.stack(ts)
    else:
        c, sc, t = codes[0], scales[0], ts[0]
    if fmt == "nvfp4":  # NVIDIA ModelOpt's layout is exactly this
        return formats.from_nvfp4_checkpoint(c, sc, t, in_features=K)
    return QuantizedTensor(jnp.asarray(np.swapaxes(c, -1, -2)), jnp.asarray(np.swapaxes(sc, -1, -2)),
                           jnp.asarray(t, jnp.float32), fmt, tuple(shape))


def _dequantize_packed(ckpt: Checkpoint, name: str) -> np.ndarray:
    """A packed FP4 tensor where the model keeps a plain weight (e.g. attention in a ModelOpt checkpoint):
    dequantized to float32 [out, in]."""
    N, k2 = ckpt.shape(name)
    qt = read_packed(ckpt, (name,), (2 * k2, N), stacked=False)
    return np.asarray(formats.dequantize(qt)).T


def checkpoint_quant(path: str) -> dict | None:
    """The `quantization_config` of an FP4 checkpoint (ours or ModelOpt NVFP4), else None."""
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            q = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if q.get("quant_method") == QUANT_METHOD:
        return q
    if q.get("quant_method") == "modelopt" and str(q.get("quant_algo", "")).upper() == "NVFP4":
        return {**q, "format": "nvfp4"}
    return None


def read_tensor(ckpt: Checkpoint, name: str, block: tuple[int, int]) -> np.ndarray:
    if name not in ckpt:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint at {ckpt.path}")
    dt = ckpt.dtype(name)
    if _is_packed(ckpt, name):
        return _dequantize_packed(ckpt, name)
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


def config_of(path: str | os.PathLike) -> ModelConfig:
    """The model config a checkpoint directory loads as (its config.json, with the MTP layers it really holds)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    n_mtp = mtp_layers_present(cfg, Checkpoint(path))
    return cfg if n_mtp == cfg.num_nextn_predict_layers else cfg.replace(num_nextn_predict_layers=n_mtp)


def load(path: str | os.PathLike, *, dtype=None, mesh=None, rules=None, quant: str | None = None,
         runtime: Runtime | None = None, capacity_factor: float = 2.0) -> DeepseekV3:
    """Load an HF DeepSeek-V3/R1 checkpoint directory into a `DeepseekV3` model.

    dtype: compute/storage dtype of the weights (default: float32 for f32 checkpoints, else bfloat16; block-fp8
    weights are dequantized on load). The router and its correction bias always stay float32. The MTP module is
    loaded when the checkpoint has `model.layers.{num_hidden_layers}.*`; otherwise the model has none.
    `mesh`/`rules` place each weight onto its sharding as it is read (see `sharding.rules`), and set the model's
    `runtime` for that mesh (kernel choices from `runtime`, expert parallelism from the rules).

    quant: None, "nvfp4" or "mxfp4" (the routed experts; "+dense" also the dense MLPs and shared experts).
    Quantized weights are `QuantizedTensor`s (packed codes + block scales + tensor scales), quantized one stack at
    a time and placed like the weight. A quantized checkpoint (`python -m checkpoints.quantize`, or ModelOpt
    NVFP4) loads packed as stored; `quant` may then be None or must name the checkpoint's format.
    """
    path = os.fspath(path)
    fmt, dense = parse_quant(quant)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    ckpt = Checkpoint(path)
    n_mtp = mtp_layers_present(cfg, ckpt)
    if n_mtp != cfg.num_nextn_predict_layers:
        log.info("checkpoint has %d MTP layer(s) (config says %d); loading %d", n_mtp,
                 cfg.num_nextn_predict_layers, n_mtp)
        cfg = cfg.replace(num_nextn_predict_layers=n_mtp)
    dtype = jnp.dtype(dtype) if dtype is not None else _default_dtype(ckpt)
    block = weight_block_size(path)
    stored = checkpoint_quant(path)
    if stored is not None:
        if fmt is not None and fmt != stored.get("format"):
            raise ValueError(f"quant={quant!r} but the checkpoint at {path} is already quantized to "
                             f"{stored.get('format')!r}; load it with quant=None (or {stored.get('format')!r})")
        if fmt is None and str(stored.get("modules", "")).endswith("+dense"):
            dense = True
        fmt = stored.get("format")

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
    scales = {k for k in ckpt.keys() if k.endswith((".weight_scale_inv", ".weight_scale", ".weight_scale_2",
                                                    ".input_scale"))}  # input_scale: FP4 activations, unused
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
        want = tuple(var.get_value().shape)
        axes = var.get_metadata().get("axes")
        # Stored packed (our quantized checkpoints, ModelOpt NVFP4) where the model can hold FP4: load as stored.
        if quantized_target(name, True) and p.build in (linear_t, stack_experts_t) and all(_is_packed(ckpt, s)
                                                                               for s in p.sources):
            var.set_value(place(read_packed(ckpt, p.sources, want, stacked=p.build is stack_experts_t), axes))
            continue
        arr = p.build([read_tensor(ckpt, s, block) for s in p.sources])
        if arr.shape != want:
            src = p.sources[0]
            raise CheckpointError(f"tensor {src!r} in {ckpt.file_of(src)} has shape {list(ckpt.shape(src))}, "
                                  f"which does not fit {name} {list(want)} for this config")
        if fmt is not None and quantized_target(name, dense):  # one stack at a time, kept packed
            var.set_value(place(formats.quantize(jnp.asarray(arr, jnp.float32), fmt), axes))
        else:
            var.set_value(place(arr.astype(var.get_value().dtype), axes))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.runtime = runtime_for(mesh, rules, base=runtime, capacity_factor=capacity_factor)
    return model


def _placer(mesh, rules):
    if mesh is None:
        return lambda value, axes: jax.tree.map(jnp.asarray, value)
    return lambda value, axes: jax.device_put(value, variable_sharding(value, axes, mesh, rules))
