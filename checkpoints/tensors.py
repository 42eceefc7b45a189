"""Tensors as a checkpoint stores them: DeepSeek block-FP8 (`weight_scale_inv` per block), packed FP4 (Tandem's
NVFP4 / MXFP4 checkpoints), and the `quant` choices that pick a load-time format."""

from __future__ import annotations

import os
import re

import jax
import ml_dtypes
import numpy as np

from checkpoints.safetensors_io import Checkpoint, CheckpointError, dtype_name
from pallas_kernels import formats
from pallas_kernels.formats import QuantizedTensor

_FLOAT_SOURCES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                  np.dtype(ml_dtypes.float8_e4m3fn)}


def _host_device():
    """A CPU device for host-side conversions (quantizing a chunk), whatever the default backend is."""
    return jax.local_devices(backend="cpu")[0]


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
    # host arrays in Tandem's layout (NVIDIA ModelOpt's NVFP4 layout transposed): placed shard by shard later
    return QuantizedTensor(np.ascontiguousarray(np.swapaxes(c, -1, -2)), np.ascontiguousarray(np.swapaxes(sc, -1, -2)),
                           np.asarray(t, np.float32), fmt, (*shape[:-2], K, N))


def _dequantize_packed(ckpt: Checkpoint, name: str) -> np.ndarray:
    """A packed FP4 tensor where the model keeps a plain weight (e.g. attention in a ModelOpt checkpoint):
    dequantized to float32 [out, in]."""
    N, k2 = ckpt.shape(name)
    qt = read_packed(ckpt, (name,), (2 * k2, N), stacked=False)
    with jax.default_device(_host_device()):
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
