"""Compile-check every Triton kernel (FP4, block-FP8, paged MLA decode) for NVIDIA GPUs on a machine without one.

Lowering for ``cuda`` (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``) builds the Triton MLIR module
that XLA's Triton pipeline would compile on a GPU, and embeds it (as MLIR bytecode) in the
``__gpu$xla.gpu.triton`` custom call. This module extracts that exact module as TTIR text and, where the ``triton``
package is available, runs Triton's own compiler on it (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) for a
given compute capability -- which needs no GPU. Two steps in two processes (jaxlib's MLIR and triton's LLVM are
kept out of one process); the test extra carries ``triton`` (3.6, the GPU machines' version), so ``make test`` runs
both for every kernel, at small shapes and at DeepSeek-V3's::

    .venv/bin/python -m pallas_kernels.triton_check dump /tmp/ttir        # jax: write <case>.ttir + launch params
    .venv/bin/python -m pallas_kernels.triton_check compile /tmp/ttir --cc 90 80

It is evidence that the kernels survive a full Triton compile for sm_90 / sm_80 (the pip ``triton`` is not the
Triton revision inside jaxlib, so XLA's own pipeline could still differ), not that they run correctly on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

TRITON_CALL = "__gpu$xla.gpu.triton"


def triton_modules(fn, *args) -> list[dict]:
    """The Triton kernels in ``jax.jit(fn)(*args)`` lowered for cuda: dicts with ``name``, ``ttir`` (text, no debug
    locations), ``num_warps``, ``num_stages``, ``grid`` (x, y, z)."""
    import jax
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    from pallas_kernels.compat import cuda_lowering

    with cuda_lowering():
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if (child.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL):
                        calls.append(child)
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    out = []
    for call in calls:
        cfg = ir.DictAttr(call.attributes["mhlo.backend_config"])
        blob = ir.StringAttr(cfg["ir"]).value_bytes
        with triton_lowering._new_ir_context(), ir.Location.unknown():
            ttir = ir.Module.parse(blob).operation.get_asm(enable_debug_info=False)

        def i(key):
            return ir.IntegerAttr(cfg[key]).value

        out.append(dict(name=ir.StringAttr(cfg["name"]).value, ttir=ttir, num_warps=i("num_warps"),
                        num_stages=i("num_stages"), grid=(i("grid_x"), i("grid_y"), i("grid_z"))))
    return out


def kernel_cases() -> dict:
    """Representative calls of every Triton kernel: name -> (fn, args). Small shapes exercise the edge paths;
    ``v3_*`` are DeepSeek-V3's shapes (Triton specializes on them): decode/prefill token counts, 7168 hidden, 2048
    expert width, 32 local experts (256 on ep=8), 128 (tp=1) and 16 (tp=8) heads over a 576-wide latent."""
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import fp8
    from pallas_kernels.formats import quantize
    from pallas_kernels.fp4_matmul import fp4_batched_matmul, fp4_grouped_matmul, fp4_matmul
    from pallas_kernels.paged_attention import paged_mla_decode

    sds = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    cases = {}
    for fmt in ("nvfp4", "mxfp4"):
        x = jnp.zeros((16, 512), bf16)
        qe = quantize(jnp.ones((4, 512, 256)), fmt)
        cases[f"fp4_dense_{fmt}"] = (functools.partial(fp4_matmul, impl="pallas"),
                                     (x, quantize(jnp.ones((512, 256)), fmt)))
        cases[f"fp4_batched_{fmt}"] = (functools.partial(fp4_batched_matmul, impl="pallas"),
                                       (jnp.zeros((4, 64, 512), bf16), qe))
        cases[f"fp4_grouped_{fmt}"] = (functools.partial(fp4_grouped_matmul, impl="pallas"),
                                       (x, qe, jnp.array([5, 3, 0, 8], jnp.int32)))
    sizes = sds((32,), jnp.int32)
    for tag, m in (("decode", 64), ("prefill", 4096)):   # tokens; x8 routed rows (top-8) for the experts
        cases[f"fp8_dense_v3_{tag}"] = (functools.partial(fp8.fp8_matmul, impl="pallas"),
                                        (sds((m, 7168), bf16), fp8.abstract((7168, 2048))))
        cases[f"fp8_grouped_v3_{tag}"] = (functools.partial(fp8.fp8_grouped_matmul, impl="pallas"),
                                          (sds((m * 8, 7168), bf16), fp8.abstract((32, 7168, 2048), lead=1),
                                           sizes))
    cases["fp8_batched_v3"] = (functools.partial(fp8.fp8_batched_matmul, impl="pallas"),
                               (sds((32, 64, 2048), bf16), fp8.abstract((32, 2048, 7168), lead=1)))
    cases["fp8_dense_unaligned"] = (functools.partial(fp8.fp8_matmul, impl="pallas"),
                                    (sds((3, 100), bf16), fp8.abstract((100, 40))))
    for H in (128, 16):
        cases[f"paged_decode_v3_h{H}"] = (
            lambda q, r, c, t, n: paged_mla_decode(q, r, c, 3, t, n, 0.1, impl="pallas"),
            (sds((64, H, 512), bf16), sds((64, H, 64), bf16), sds((4, 512, 64, 576), bf16),
             sds((64, 64), jnp.int32), sds((64,), jnp.int32)))
    return cases


def dump(out_dir: str) -> list[str]:
    """Write ``<case>[.k].ttir`` and ``.json`` (launch parameters) for every Triton module of every kernel case."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for case, (fn, args) in kernel_cases().items():
        mods = triton_modules(fn, *args)
        if not mods:
            raise RuntimeError(f"{case}: no Triton kernel in its cuda lowering")
        for k, mod in enumerate(mods):
            stem = os.path.join(out_dir, case if len(mods) == 1 else f"{case}.{k}")
            with open(stem + ".ttir", "w") as f:
                f.write(mod["ttir"])
            with open(stem + ".json", "w") as f:
                json.dump({k: v for k, v in mod.items() if k != "ttir"}, f)
            written.append(stem + ".ttir")
    return written


def compile_ttir(path: str, cc: int, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile a .ttir file with the ``triton`` package for CUDA compute capability ``cc`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    k = triton.compile(path, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps,
                                                                            num_stages=num_stages))
    ptx = k.asm["ptx"]
    # the tensor-core instructions and their operand types, e.g. "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    dots = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\.[\w.]+", ptx)))
    return dict(ptx_chars=len(ptx), cubin_bytes=len(k.asm.get("cubin", b"")), shared_bytes=k.metadata.shared,
                mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"), dots=dots,
                triton=triton.__version__)


def compile_dir(ttir_dir: str, ccs: list[int]) -> int:
    failures = 0
    for fname in sorted(os.listdir(ttir_dir)):
        if not fname.endswith(".ttir"):
            continue
        with open(os.path.join(ttir_dir, fname[:-5] + ".json")) as f:
            meta = json.load(f)
        for cc in ccs:
            try:
                r = compile_ttir(os.path.join(ttir_dir, fname), cc, meta["num_warps"], meta["num_stages"])
                print(f"{fname[:-5]:16s} sm_{cc}: OK {json.dumps(r)}", flush=True)
            except Exception as e:  # report every kernel/arch, then fail
                failures += 1
                print(f"{fname[:-5]:16s} sm_{cc}: FAIL {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out_dir")
    c = sub.add_parser("compile")
    c.add_argument("ttir_dir")
    c.add_argument("--cc", type=int, nargs="+", default=[90, 80])
    a = ap.parse_args(argv)
    if a.cmd == "dump":
        for p in dump(a.out_dir):
            print(p)
        return 0
    return 1 if compile_dir(a.ttir_dir, a.cc) else 0


if __name__ == "__main__":
    sys.exit(main())
