"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls of fn, after one warm-up call (compilation / caches)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def dot_chain_seconds(M: int, D: int, links: int, repeats: int, reduce=statistics.median) -> float:
    """Seconds per link of a jitted chain x <- tanh(x @ W_i) with `links` distinct [D, D] f32 weights, M rows
    (XLA:CPU on model-sized GEMMs, each dot's fixed cost included); `reduce` over `repeats` timed calls."""
    import jax
    import jax.numpy as jnp

    ws = [jnp.full((D, D), 1e-3, jnp.float32) + i for i in range(links)]

    def chain(x, ws):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x

    f, x = jax.jit(chain), jnp.ones((M, D), jnp.float32)
    f(x, ws).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x, ws).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return reduce(ts) / links
