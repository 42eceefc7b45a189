"""Decode speed over a grid of DeepSeek-shaped configs, against transformers on the same random checkpoint.

    python -m bench.decode_grid [--configs A,B,...] [--batches 1,4,16,64] [--moe_only]

For each config (hidden, routed experts, top-k, layers) a random HF checkpoint is written with `transformers`
(test extra), then decoded by Tandem (`LLM` with its offline default of 2048 prompt tokens prefilled per scheduler
step, batched prefill of up to 16 prompts of 32 tokens per call (`prefill_rows=(1, 4, 16), prefill_tokens=512`),
one device, f32, 8 steps per dispatch, the MoE path chosen per shape by `model.moe.choose_moe_impl`) and by `transformers` `generate()` (torch, f32, greedy) on the same 32-token
prompts, 64 new tokens, `--runs` timed runs per cell (default 3; the headline is the worst run). Per cell: tok/s of both and the ratio, useful FLOP/s per step
(`model.flops.decode_flops`) as a fraction of the matmul peak measured in the run, and where a decode step's
time goes — attention, MoE (routed + shared experts and router), dense MLP, sampling, other device work and host —
from a `jax.profiler` trace of one generation: each XLA op of the trace is mapped to the named scope it was
traced under (the compiled HLO's op metadata), host = dispatch wall time - device time.

Two bounds per cell, both measured in the run: the roofline (weights once at the streaming bandwidth, useful FLOPs
at the 1024^3 matmul peak) and the same at the rate XLA:CPU's GEMMs reach on the cell's own [B, D] x [D, D] shape
(a chain of dots, their fixed cost included): how fast an XLA engine could be on this CPU.

`--moe_only` times each routed-expert implementation (dense / gather / capacity / ragged) on one MoE layer per cell
instead: the data behind the cost model's constants.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.grid_configs import CONFIGS, hf_config

flags.DEFINE_list("configs", ["A", "B", "C", "D", "E", "F"], "grid cells (see CONFIGS)")
flags.DEFINE_list("batches", ["1", "4", "16", "64"], "batch sizes")
flags.DEFINE_integer("prompt", 32, "prompt tokens")
flags.DEFINE_integer("new_tokens", 64, "generated tokens per request")
flags.DEFINE_bool("skip_hf", False, "skip transformers")
flags.DEFINE_integer("runs", 3, "timed runs per cell (Tandem then transformers, interleaved); the headline ratio is "
                     "the worst run's")
flags.DEFINE_bool("profile", True, "step-time breakdown from a jax.profiler trace")
flags.DEFINE_bool("moe_only", False, "time the routed-expert implementations on one layer instead")
flags.DEFINE_string("json", None, "write the results here too")
FLAGS = flags.FLAGS

def matmul_peak() -> float:
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = min(_time(lambda: f(a, a).block_until_ready()) for _ in range(5))
    return 2 * 1024 ** 3 / best


def stream_bandwidth() -> float:
    """Bytes/s at which a jitted matrix-vector product streams a 256 MiB f32 matrix (the decode step's weight
    access pattern), best of 5. (An elementwise pass is the wrong probe: its fresh 256 MiB output buffer costs
    page faults every call and reads ~6x lower.)"""
    W = jnp.ones((8192, 8192), jnp.float32)
    v = jnp.ones((8192,), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(W, v).block_until_ready()
    best = min(_time(lambda: f(W, v).block_until_ready()) for _ in range(5))
    return W.nbytes / best


_GEMM_RATES: dict[tuple[int, int], float] = {}


def gemm_rate(M: int, D: int, links: int = 20) -> float:
    """FLOP/s XLA:CPU reaches on this cell's GEMM shape: a jitted chain of `links` [M, D] x [D, D] f32 dots (each
    with its own weight, as a decode step's layers), best of 9 (cached per shape)."""
    from bench.timing import dot_chain_seconds

    if (M, D) not in _GEMM_RATES:
        _GEMM_RATES[M, D] = 2 * M * D * D / dot_chain_seconds(M, D, links, 9, reduce=min)
    return _GEMM_RATES[M, D]


def step_weight_bytes(model, B: int) -> float:
    """Weight bytes one decode step of B rows must read, each weight once: everything but the embedding table
    (B rows gathered) and the MTP module; routed experts count the expected number of distinct experts B tokens
    pick (E x (1 - (1 - k/E)^B), uniform routing)."""
    from flax import nnx

    cfg = model.cfg
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    active = E * (1 - (1 - k / E) ** B) / E if E else 0.0
    total = 0.0
    for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        name = jax.tree_util.keystr(path)
        if "['mtp']" in name or "embed_tokens" in name:
            continue
        nbytes = v.size * v.dtype.itemsize
        total += nbytes * (active if "experts_" in name and "shared" not in name else 1.0)
    return total


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- step-time breakdown from a profile -----------------------------------------------------------------------
_CATEGORIES = (("sampling", "sampling"), ("moe", "moe"), ("mlp", "mlp"), ("attention", "attention"))
_CONTAINERS = re.compile(r"^(while|cond|conditional|call|ThunkExecutor|PjitFunction|\$|Parse|Common|np\.)")


def _scope_of_instructions(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> category, from each instruction's op_name metadata (its named scopes)."""
    out = {}
    for m in re.finditer(r"^\s*%?([\w.\-]+) = [^\n]*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.M):
        name, op = m.group(1), m.group(2)
        out[name] = next((cat for key, cat in _CATEGORIES if f"/{key}" in op or op.startswith(key)), "other")
    return out


def profile_breakdown(llm, prompts, sp) -> dict[str, float]:
    """ms per decode step: attention / moe / mlp / sampling / other device / host, from one traced generation."""
    eng = llm.decode_engine
    scopes = {}
    for exe in (e for k, e in eng.executables().items() if k[0] == "decode"):
        scopes.update(_scope_of_instructions(exe.as_text()))
    d = tempfile.mkdtemp(prefix="tandem-prof-")
    steps_before = 0
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    t0 = time.perf_counter()
    reqs = [llm.submit(p, sp) for p in prompts]
    while llm.has_work():
        llm.step()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    f = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    evs = json.load(gzip.open(f[-1]))
    evs = evs["traceEvents"] if isinstance(evs, dict) else evs
    shutil.rmtree(d, ignore_errors=True)
    acc = collections.Counter()
    decode_wall = 0.0
    for e in evs:
        if e.get("ph") != "X":
            continue
        name, dur = e["name"], e.get("dur", 0) / 1e3
        if name.startswith("$engine.py") and " generate" in name:
            decode_wall += dur
        if name in scopes and not _CONTAINERS.match(name):
            acc[scopes[name]] += dur
    steps = max(1, sum(len(r.output_ids) for r in reqs) // max(1, len(reqs)) - 1) - steps_before
    device = sum(acc.values())
    out = {k: acc.get(k, 0.0) / steps for k in ("attention", "moe", "mlp", "sampling", "other")}
    out["host"] = max(0.0, decode_wall - device) / steps
    out["step_ms"] = decode_wall / steps
    del wall
    return out


# ---- the grid ---------------------------------------------------------------------------------------------------
def run_cell(name, peak, bw, batches, rng, out):
    import torch
    from transformers import DeepseekV3ForCausalLM

    import checkpoints
    import hf_reference
    from model.flops import decode_flops
    from serving import LLM, EngineConfig, SamplingParams

    D, E, X, L = CONFIGS[name]
    path = tempfile.mkdtemp(prefix=f"tandem-grid-{name}-")
    hf_reference.build(path, hf_config(D, E, X, L), seed=1)
    model = checkpoints.load(path, dtype=jnp.float32)
    # batched prefill up to 16 prompts of 32 tokens per call (512 tokens; the default stops at the largest bucket)
    ec = EngineConfig(page_size=16, num_pages=64 * 8 + 1, max_model_len=128, prefill_buckets=(32, 128),
                      prefill_rows=(1, 4, 16), prefill_tokens=512,
                      decode_buckets=tuple(batches), decode_steps=8, decode_windows=(8,))
    hf = None if FLAGS.skip_hf else DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    with LLM(model=model, engine_config=ec) as llm:
        for B in batches:
            prompts = [rng.integers(2, 4096, FLAGS.prompt).tolist() for _ in range(B)]
            llm.generate(prompts, sp)
            gemm = gemm_rate(B, D)   # now, before torch runs (its idle OpenMP threads spin for a while after)
            ids = None
            if hf is not None:
                ids = torch.tensor(prompts, dtype=torch.long)
                with torch.no_grad():
                    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            runs = []   # (tandem tok/s, transformers tok/s) per run, each the best of 2 timings
            for _ in range(FLAGS.runs):
                dt = min(_time(lambda: llm.generate(prompts, sp)) for _ in range(2))
                hdt = float("nan")
                if hf is not None:
                    with torch.no_grad():
                        hdt = min(_time(lambda: hf.generate(ids, max_new_tokens=FLAGS.new_tokens,
                                                            min_new_tokens=FLAGS.new_tokens, do_sample=False,
                                                            pad_token_id=0)) for _ in range(2))   # as Tandem
                runs.append((B * FLAGS.new_tokens / dt, B * FLAGS.new_tokens / hdt))
            worst = min(runs, key=lambda r: r[0] / r[1] if hf is not None else r[0])
            tok_s, hf_tok_s = worst
            prof = profile_breakdown(llm, prompts, sp) if FLAGS.profile else {}
            step_s = prof.get("step_ms", float("nan")) / 1e3
            flops = decode_flops(model.cfg, B, ec.max_model_len)
            useful = flops / step_s if prof else float("nan")
            # roofline: the step can be no faster than reading its weights once at the measured bandwidth, nor
            # than its useful FLOPs at the measured matmul peak; transformers must read the same weights
            wbytes = step_weight_bytes(model, B)
            roof_tok_s = B / max(wbytes / bw, flops / peak)
            # the same bound at the rate XLA:CPU's GEMMs reach on this cell's [B, D] x [D, D] shape (a chain of
            # dots, per-dot cost included) instead of the 1024^3 peak: what this CPU allows an XLA engine
            gemm_tok_s = B / max(wbytes / bw, flops / gemm)
            r = dict(cell=name, D=D, E=E, X=X, L=L, batch=B, tok_s=tok_s, hf_tok_s=hf_tok_s,
                     ratio=tok_s / hf_tok_s, run_ratios=[a / b for a, b in runs], moe_impl=llm.decode_engine.moe_impl(B), useful_gflops=useful / 1e9,
                     of_peak=useful / peak, weight_mb=wbytes / 1e6, roofline_tok_s=roof_tok_s,
                     roofline_ratio=roof_tok_s / hf_tok_s, of_roofline=tok_s / roof_tok_s,
                     gemm_gflops=gemm / 1e9, gemm_tok_s=gemm_tok_s, gemm_ratio=gemm_tok_s / hf_tok_s,
                     of_gemm=tok_s / gemm_tok_s,
                     **{f"{k}_ms": v for k, v in prof.items()})
            out.append(r)
            print(f"{name} D={D:4d} E={E:3d} k={X} L={L} B={B:3d} | tandem {tok_s:8.1f} hf {hf_tok_s:8.1f} "
                  f"{r['ratio']:5.2f}x | roofline {roof_tok_s:8.1f} = {r['roofline_ratio']:5.2f}x hf, tandem at "
                  f"{r['of_roofline']:4.0%} | at XLA's GEMM rate ({r['gemm_gflops']:.0f} GFLOP/s) {gemm_tok_s:8.1f} = "
                  f"{r['gemm_ratio']:5.2f}x hf | moe={r['moe_impl']:>8} | {r['useful_gflops']:6.2f} GFLOP/s "
                  f"({r['of_peak']:5.1%}) | step {prof.get('step_ms', 0):6.2f} ms = attn "
                  f"{prof.get('attention', 0):5.2f} moe {prof.get('moe', 0):5.2f} mlp {prof.get('mlp', 0):5.2f} "
                  f"samp {prof.get('sampling', 0):5.2f} other {prof.get('other', 0):5.2f} host "
                  f"{prof.get('host', 0):5.2f}", flush=True)
    shutil.rmtree(path, ignore_errors=True)


def moe_only(batches, rng, out):
    from model.config import ModelConfig
    from model.moe import _LOCAL_IMPLS, choose_moe_impl, moe_costs

    for name in FLAGS.configs:
        D, E, X, L = CONFIGS[name]
        F = D // 2
        r = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)
        g, u, d = r(E, D, F), r(E, D, F), r(E, F, D)
        cfg = ModelConfig(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=X,
                          n_group=1, topk_group=1)
        for B in batches:
            x = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
            idx = jnp.asarray(np.stack([rng.choice(E, X, replace=False) for _ in range(B)]), jnp.int32)
            w = jnp.asarray(rng.random((B, X)), jnp.float32)
            t = {}
            for k, fn in _LOCAL_IMPLS.items():
                f = jax.jit(fn)
                f(x, w, idx, g, u, d).block_until_ready()
                t[k] = statistics.median(_time(lambda: f(x, w, idx, g, u, d).block_until_ready())
                                         for _ in range(15))
            chosen = choose_moe_impl(cfg, B, "cpu")
            best = min(t, key=t.get)
            out.append(dict(cell=name, batch=B, measured_us={k: v * 1e6 for k, v in t.items()}, chosen=chosen,
                            best=best, modelled_us={k: v * 1e6 for k, v in moe_costs(cfg, B).items()}))
            print(f"{name} D={D} E={E} k={X} B={B:3d} | " + " ".join(f"{k} {v * 1e6:9.1f}" for k, v in t.items())
                  + f" us | chosen {chosen} ({t[chosen] / t[best]:.2f}x the best, {best})", flush=True)


def main(argv):
    del argv
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    rng = np.random.default_rng(0)
    batches = [int(b) for b in FLAGS.batches]
    out = []
    print(f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
    if FLAGS.moe_only:
        moe_only(batches, rng, out)
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        peak, bw = matmul_peak(), stream_bandwidth()
        print(f"matmul peak (f32 1024^3, now): {peak / 1e9:.1f} GFLOP/s; weight-streaming bandwidth (matvec over "
              f"256 MiB f32): {bw / 1e9:.1f} GB/s")
        for name in FLAGS.configs:
            run_cell(name, peak, bw, batches, rng, out)
        ratios = {B: [r["ratio"] for r in out if r["batch"] == B] for B in batches}
        for B, rs in ratios.items():
            print(f"batch {B:3d}: ratio median {statistics.median(rs):.2f}x, worst {min(rs):.2f}x")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    app.run(main)
