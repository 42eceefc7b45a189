"""Write an FP4-quantized copy of an HF DeepSeek-V3 checkpoint (packed weights + scales) that loads as stored.

    python -m checkpoints.quantize SRC DST --format nvfp4|mxfp4 [--dense]

Quantized: every routed expert's `gate_proj` / `up_proj` / `down_proj` (with `--dense` also the dense MLP layers
and the shared experts). Each is written under its HF name in NVIDIA ModelOpt's NVFP4 layout, HF `[out, in]`
orientation, packed along `in`:

    {module}.weight          U8       [out, ceil(in / B) * B / 2]   two e2m1 codes per byte, even `in` index in the
                                                                     low nibble (bit 3 = sign)
    {module}.weight_scale    F8_E4M3  [out, ceil(in / 16)]          nvfp4 block scales (B = 16)
                             F8_E8M0  [out, ceil(in / 32)]          mxfp4 block scales (B = 32)
    {module}.weight_scale_2  F32      []                            nvfp4 tensor scale (absent for mxfp4)

so that `w[o, i] = e2m1(code[o, i]) * weight_scale[o, i // B] * weight_scale_2`. Everything else (attention,
embedding, head, norms, router) is copied unchanged. `config.json` gets

    "quantization_config": {"quant_method": "tandem_fp4", "format": "nvfp4", "group_size": 16,
                             "modules": "experts" | "experts+dense", "weight_layout": ..., ...}

The codes and scales are exactly those `checkpoints.load(SRC, quant=...)` computes (the same per-stack quantizer
over the loader's own plans), so loading DST gives bit-identical packed weights without re-quantizing.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np

from checkpoints import safetensors_io
from checkpoints.loader import mtp_layers_present, plans
from checkpoints.tensors import (QUANT_FORMATS, QUANT_METHOD, parse_quant, quantized_target, read_tensor,
                                 weight_block_size)
from checkpoints.safetensors_io import Checkpoint, CheckpointError
from model.config import ModelConfig
from pallas_kernels import formats


def _hf_tensors(qt: formats.QuantizedTensor, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A QuantizedTensor ([E, K, N] for E names, or [K, N]) -> per-name HF-orientation packed tensors."""
    codes = np.swapaxes(np.asarray(qt.codes), -1, -2)       # [..., N, Kp/2]
    scales = np.swapaxes(np.asarray(qt.scales), -1, -2)     # [..., N, Kp/B]
    ts = np.asarray(qt.tensor_scale, np.float32)
    if len(qt.shape) == 2:
        codes, scales, ts = codes[None], scales[None], ts[None]
    out = {}
    for e, n in enumerate(names):
        base = n[: -len("weight")]
        out[n] = np.ascontiguousarray(codes[e])
        out[base + "weight_scale"] = np.ascontiguousarray(scales[e])
        if qt.fmt == "nvfp4":
            out[base + "weight_scale_2"] = np.asarray(ts[e], np.float32).reshape(())
    return out


def quantize_checkpoint(src: str, dst: str, fmt: str, *, dense: bool = False, log=print) -> dict:
    """Write the quantized copy of `src` to `dst`; returns a summary (tensor counts and bytes)."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {QUANT_FORMATS}")
    parse_quant(fmt + ("+dense" if dense else ""))
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("SRC and DST must differ")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    old_q = config.get("quantization_config") or {}
    if old_q.get("quant_method") in (QUANT_METHOD, "modelopt"):
        raise ValueError(f"{src} is already FP4-quantized ({old_q.get('quant_method')})")
    cfg = ModelConfig.from_hf(src)
    ckpt = Checkpoint(src)
    cfg = cfg.replace(num_nextn_predict_layers=mtp_layers_present(cfg, ckpt))
    block = weight_block_size(src)
    plan = plans(cfg, ckpt)

    out: dict[str, np.ndarray] = {}
    consumed: set[str] = set()
    q_bytes = src_bytes = 0
    n_q = 0
    t0 = time.time()
    for name, p in plan.items():
        if not quantized_target(name, dense):
            continue
        if p.kind not in ("linear", "experts"):
            raise CheckpointError(f"{name}: the source stores it as {p.sources[0]!r} (a fused layout); "
                                  "checkpoints.quantize writes per-expert tensors only")
        arr = p.build([read_tensor(ckpt, s, block) for s in p.sources])
        qt = formats.quantize(jnp.asarray(arr, jnp.float32), fmt)   # the loader's quantize-at-load, verbatim
        tensors = _hf_tensors(qt, p.sources)
        out.update(tensors)
        consumed.update(p.sources)
        src_bytes += sum(int(np.prod(ckpt.shape(s))) * ckpt.dtype(s).itemsize for s in p.sources)
        q_bytes += sum(t.nbytes for t in tensors.values())
        n_q += len(p.sources)
    other_bytes = 0
    for k in ckpt.keys():
        if k in consumed or (k.endswith(".weight_scale_inv") and k[: -len("_scale_inv")] in consumed):
            continue  # quantized above (with its block-fp8 scale, if it had one)
        out[k] = ckpt.get(k)
        other_bytes += out[k].nbytes

    os.makedirs(dst, exist_ok=True)
    qcfg = {"quant_method": QUANT_METHOD, "format": fmt, "quant_algo": fmt.upper(),
            "group_size": formats.BLOCK_SIZE[fmt], "modules": "experts+dense" if dense else "experts",
            "quantized_modules": ["mlp.experts.*.{gate,up,down}_proj"]
            + (["mlp.{gate,up,down}_proj", "mlp.shared_experts.{gate,up,down}_proj"] if dense else []),
            "weight_layout": "weight: uint8 [out, ceil(in/B)*B/2], even in-index in the low nibble; "
                             "weight_scale: [out, ceil(in/B)] " + ("float8_e4m3fn; weight_scale_2: float32 []"
                                                                 if fmt == "nvfp4" else "float8_e8m0fnu"),
            "activations": "unquantized (weight-only FP4)"}
    if "weight_block_size" in old_q:  # block-fp8 tensors copied as they are still need their block size
        qcfg["weight_block_size"] = old_q["weight_block_size"]
    config["quantization_config"] = qcfg
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    safetensors_io.write(os.path.join(dst, "model.safetensors"), out, metadata={"format": "pt"})
    for fname in os.listdir(src):  # tokenizer, generation config, held-out text, ...
        full = os.path.join(src, fname)
        if (os.path.isfile(full) and fname != "config.json" and not fname.endswith(".safetensors")
                and fname != "model.safetensors.index.json"):
            shutil.copy2(full, os.path.join(dst, fname))
    summary = dict(format=fmt, dense=dense, quantized_tensors=n_q, quantized_source_bytes=src_bytes,
                   quantized_bytes=q_bytes, other_bytes=other_bytes, seconds=time.time() - t0)
    log(f"{dst}: {n_q} tensors quantized to {fmt}: {src_bytes / 1e6:.2f} MB -> {q_bytes / 1e6:.2f} MB "
        f"({q_bytes / max(src_bytes, 1):.3f}x); other tensors {other_bytes / 1e6:.2f} MB copied")
    return summary


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m checkpoints.quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF DeepSeek-V3 checkpoint directory")
    ap.add_argument("dst", help="output directory")
    ap.add_argument("--format", required=True, choices=QUANT_FORMATS)
    ap.add_argument("--dense", action="store_true", help="also quantize the dense MLPs and shared experts")
    a = ap.parse_args(argv)
    quantize_checkpoint(a.src, a.dst, a.format, dense=a.dense)


if __name__ == "__main__":
    main()
