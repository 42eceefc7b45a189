"""Compile-check the FP4 Triton kernels for NVIDIA GPUs on a machine without one.

Lowering for ``cuda`` (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``) builds the Triton MLIR module
that XLA's Triton pipeline would compile on a GPU, and embeds it (as MLIR bytecode) in the
``__gpu$xla.gpu.triton`` custom call. This module extracts that exact module as TTIR text and, where the ``triton``
package is available, runs Triton's own compiler on it (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) for a
given compute capability -- which needs no GPU. Two steps, because the project venv does not carry ``triton``::

    .venv/bin/python -m pallas_kernels.triton_check dump /tmp/fp4_ttir          # jax: write *.ttir
    /path/to/python-with-triton -m pallas_kernels.triton_check compile /tmp/fp4_ttir --cc 90 80

It is evidence that the kernels survive a full Triton compile for sm_90 / sm_80 (the pip ``triton`` is not the
Triton revision inside jaxlib, so XLA's own pipeline could still differ), not that they run correctly on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TRITON_CALL = "__gpu$xla.gpu.triton"


def triton_modules(fn, *args) -> list[dict]:
    """The Triton kernels in ``jax.jit(fn)(*args)`` lowered for cuda: dicts with ``name``, ``ttir`` (text, no debug
    locations), ``num_warps``, ``num_stages``, ``grid`` (x, y, z)."""
    import jax
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

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


def fp4_kernel_cases() -> dict:
    """Representative calls of every FP4 Triton kernel: name -> (fn, args)."""
    import functools

    import jax.numpy as jnp

    from pallas_kernels.formats import quantize
    from pallas_kernels.fp4_matmul import fp4_batched_matmul, fp4_grouped_matmul, fp4_matmul

    cases = {}
    for fmt in ("nvfp4", "mxfp4"):
        x = jnp.zeros((16, 512), jnp.bfloat16)
        qe = quantize(jnp.ones((4, 512, 256)), fmt)
        cases[f"dense_{fmt}"] = (functools.partial(fp4_matmul, impl="pallas"), (x, quantize(jnp.ones((512, 256)), fmt)))
        cases[f"batched_{fmt}"] = (functools.partial(fp4_batched_matmul, impl="pallas"),
                                   (jnp.zeros((4, 64, 512), jnp.bfloat16), qe))
        cases[f"grouped_{fmt}"] = (functools.partial(fp4_grouped_matmul, impl="pallas"),
                                   (x, qe, jnp.array([5, 3, 0, 8], jnp.int32)))
    return cases


def dump(out_dir: str) -> list[str]:
    """Write ``<case>.ttir`` and ``<case>.json`` (launch parameters) for every FP4 kernel case."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for case, (fn, args) in fp4_kernel_cases().items():
        [mod] = triton_modules(fn, *args)
        path = os.path.join(out_dir, f"{case}.ttir")
        with open(path, "w") as f:
            f.write(mod["ttir"])
        with open(os.path.join(out_dir, f"{case}.json"), "w") as f:
            json.dump({k: v for k, v in mod.items() if k != "ttir"}, f)
        written.append(path)
    return written


def compile_ttir(path: str, cc: int, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile a .ttir file with the ``triton`` package for CUDA compute capability ``cc`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    k = triton.compile(path, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps,
                                                                            num_stages=num_stages))
    ptx = k.asm["ptx"]
    return dict(ptx_chars=len(ptx), cubin_bytes=len(k.asm.get("cubin", b"")), shared_bytes=k.metadata.shared,
                mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"), triton=triton.__version__)


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
