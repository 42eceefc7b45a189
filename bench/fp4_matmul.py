"""FP4 weights on CPU: weight bytes (NVFP4 / MXFP4 vs bf16) and the XLA path (dequantize + dot) vs a bf16 dot.

    .venv/bin/python -m bench.fp4_matmul [--reps 20] [--quick]

The CPU path dequantizes the whole weight on every call (there is no FP4 matmul unit on a CPU), so it is expected to
be slower than a bf16 dot; its point is memory (checkpoint and resident bytes) and running the same model code on
CPU. Numbers are medians over --reps timed calls after a warm-up, jitted, on whatever CPU this runs on.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.formats import fp4_nbytes, quantize
from pallas_kernels.fp4_matmul import fp4_grouped_matmul, fp4_matmul


def _median_ms(*calls, reps: int) -> list[float]:
    """Median wall time (ms) of each (f, *args) in ``calls``; the calls are interleaved within each repetition so
    that load from other processes on a shared machine hits them alike."""
    for f, *args in calls:
        jax.block_until_ready(f(*args))  # compile + warm up
    ts: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for i, (f, *args) in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in ts]


def weight_bytes_table() -> list[str]:
    rows = ["| weight [K, N] | bf16 bytes | NVFP4 bytes (ratio) | MXFP4 bytes (ratio) |", "|---|---|---|---|"]
    for name, shape in [("V3 routed expert gate/up [7168, 2048]", (7168, 2048)),
                        ("V3 routed expert down [2048, 7168]", (2048, 7168)),
                        ("V3 dense MLP gate/up [7168, 18432]", (7168, 18432)),
                        ("256 experts gate [256, 7168, 2048]", (256, 7168, 2048))]:
        bf16 = int(np.prod(shape)) * 2
        nv, mx = fp4_nbytes(shape, "nvfp4"), fp4_nbytes(shape, "mxfp4")
        rows.append(f"| {name} | {bf16:,} | {nv:,} ({nv / bf16:.3f}x) | {mx:,} ({mx / bf16:.3f}x) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    args = ap.parse_args()
    reps = args.reps

    print(f"# FP4 matmul bench: jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load avg {os.getloadavg()[0]:.2f} at start")
    print()
    for line in weight_bytes_table():
        print(line)

    K, N = (1024, 1024) if args.quick else (7168, 2048)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(K, N)).astype(np.float32) * 0.02)
    w_bf16 = w.astype(jnp.bfloat16)
    q = {fmt: jax.block_until_ready(quantize(w, fmt)) for fmt in ("nvfp4", "mxfp4")}
    for fmt, qt in q.items():
        assert qt.nbytes == fp4_nbytes((K, N), fmt)
        print(f"\nmeasured {fmt} QuantizedTensor.nbytes for [{K}, {N}]: {qt.nbytes:,} "
              f"= {qt.nbytes / w_bf16.nbytes:.3f}x of bf16 ({w_bf16.nbytes:,})")

    bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    fp4_dot = jax.jit(functools.partial(fp4_matmul, impl="xla"))
    print("\n| dense x[M, K] @ W[K, N] | bf16 dot (ms) | NVFP4 XLA path (ms) | MXFP4 XLA path (ms) |")
    print("|---|---|---|---|")
    for M in ((1, 16) if args.quick else (1, 16, 256)):
        x = jnp.asarray(rng.normal(size=(M, K)), jnp.bfloat16)
        t_bf, t_nv, t_mx = _median_ms((bf16_dot, x, w_bf16), (fp4_dot, x, q["nvfp4"]), (fp4_dot, x, q["mxfp4"]),
                                      reps=reps)
        print(f"| M={M}, K={K}, N={N} | {t_bf:.2f} | {t_nv:.2f} ({t_nv / t_bf:.1f}x) | {t_mx:.2f} ({t_mx / t_bf:.1f}x) |")

    # grouped (MoE experts): the FACTS.md shape, T=512 token copies sorted over E=16 experts
    T, Kg, Ng, E = 512, 256, 512, 16
    we = jnp.asarray(rng.normal(size=(E, Kg, Ng)).astype(np.float32) * 0.02)
    we_bf16 = we.astype(jnp.bfloat16)
    qe = quantize(we, "nvfp4")
    x = jnp.asarray(rng.normal(size=(T, Kg)), jnp.bfloat16)
    gs = jnp.asarray(np.bincount(rng.integers(0, E, T), minlength=E).astype(np.int32))
    rd = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
    gfp4 = jax.jit(functools.partial(fp4_grouped_matmul, impl="xla"))
    t_rd, t_g = _median_ms((rd, x, we_bf16, gs), (gfp4, x, qe, gs), reps=reps)
    print(f"\n| grouped T={T}, K={Kg}, N={Ng}, E={E} | ragged_dot bf16 {t_rd:.2f} ms | "
          f"NVFP4 XLA path {t_g:.2f} ms ({t_g / t_rd:.1f}x) |")
    print(f"\nload avg {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
