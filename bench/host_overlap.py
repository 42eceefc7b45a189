"""Exposed host time per decode dispatch, the scheduler's overlapped decode off vs on.

    python -m bench.host_overlap [--configs shipped,D,latent-8e] [--batches 1,16,64] [--runs 3] [--mtp]

Per config and batch: B prompts of 32 tokens, 96 new tokens each (ignore_eos), `LLM.generate` with the offline
prefill budget (every prompt prefilled before decoding starts) and the engine's defaults (f32 on CPU, 4 steps per
dispatch), traced with `jax.profiler` (host tracer on, Python tracer off). In the trace, the device is busy while
XLA runs an executable (the union of XLA:CPU's `ThunkExecutor::Execute` intervals, on any thread); from the first
decode dispatch to the end of the last execution, the rest is the device waiting for the host:

* **exposed host time per dispatch** = (that span - busy time) / decode dispatches: preparing the next batch,
  reading tokens, stop rules, events, the text stage — whatever the device waited for;
* **dispatch period** = that span / decode dispatches (what one dispatch costs end to end).

Without overlap the host works between dispatches; with it (`SchedulerConfig.overlap_decode`, the default) dispatch
n+1 is queued from dispatch n's tokens on the device before the host reads and books dispatch n. On this 2-core CPU
the host thread and XLA's compute threads share the cores, so host work still lengthens the step it overlaps a
little (busy time goes up); on a GPU it would not. The modes alternate within each round (shared-machine drift hits
both); the headline per cell is the worst (largest) exposed time of `--runs` rounds. Configs: the shipped model,
the decode grid's config D (bench.decode_grid: hidden 512, 8 experts, 8 layers) and latent-8e (bench.vs_vllm:
DeepSeek's latent dims), random weights for the last two.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

flags.DEFINE_list("configs", ["shipped", "D", "latent-8e"], "shipped, a decode-grid cell (A-F) or a bench.vs_vllm "
                  "config")
flags.DEFINE_list("batches", ["1", "16", "64"], "batch sizes")
flags.DEFINE_integer("runs", 3, "rounds per cell (each: overlap off, on, device-only); the headline is the worst")
flags.DEFINE_integer("new_tokens", 96, "generated tokens per request")
flags.DEFINE_bool("mtp", False, "decode with MTP speculation (configs whose checkpoint has an MTP layer: shipped)")
flags.DEFINE_string("json", None, "write the results here too")
flags.DEFINE_bool("header", True, "internal: print the table header")
FLAGS = flags.FLAGS


def build(name: str):
    """(LLM factory kwargs) for config `name`."""
    import jax.numpy as jnp
    from flax import nnx

    from model.config import ModelConfig
    from model.deepseek import DeepseekV3
    from serving import EngineConfig

    if name == "shipped":
        return {}
    if len(name) == 1:
        from bench.grid_configs import CONFIGS as GRID, hf_config
        cfg = ModelConfig.from_hf(hf_config(*GRID[name]))
    else:
        from bench.vs_vllm import CONFIGS
        cfg = ModelConfig(**CONFIGS[name])
    model = DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    return dict(model=model, engine_config=EngineConfig(max_model_len=min(512, cfg.max_position_embeddings)))


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def measure(llm, prompts, sp) -> dict:
    """One traced generation: decode dispatches, their span, device busy time within it (us)."""
    d = tempfile.mkdtemp(prefix="tandem-overlap-")
    try:
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0
        jax.profiler.start_trace(d, profiler_options=opts)
        try:
            llm.generate(prompts, sp)
        finally:
            jax.profiler.stop_trace()
        f = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        evs = json.load(gzip.open(f[-1]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    evs = [e for e in (evs["traceEvents"] if isinstance(evs, dict) else evs) if e.get("ph") == "X"]
    calls, end = [], float("-inf")   # decode calls (the event nests inside one of the same name: outermost only)
    for e in sorted((e for e in evs if e["name"].startswith("PjitFunction(jit(_decode_fn")), key=lambda e: e["ts"]):
        if e["ts"] >= end:
            calls.append(e["ts"])
            end = e["ts"] + e["dur"]
    runs = [(e["ts"], e["ts"] + e["dur"]) for e in evs if e["name"] == "ThunkExecutor::Execute"]
    t0 = calls[0]
    t1 = max(b for _, b in runs)
    busy = _union([(max(a, t0), b) for a, b in runs if b > t0])
    n = len(calls)
    return dict(dispatches=n, span_us=t1 - t0, busy_us=busy, exposed_ms=(t1 - t0 - busy) / n / 1e3,
                period_ms=(t1 - t0) / n / 1e3)


def main(_):
    from serving import LLM, SamplingParams
    from serving.config import OFFLINE_PREFILL_BUDGET, SchedulerConfig

    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    batches = [int(b) for b in FLAGS.batches]
    results = []
    if FLAGS.header:
        print("| config | batch | dispatches | period ms, overlap off | exposed ms, off | period ms, on | "
              "exposed ms, on |")
        print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    if len(FLAGS.configs) > 1:   # one process per config: XLA:CPU's JIT runs out of mappings with several models
        for name in FLAGS.configs:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                args = [sys.executable, "-m", "bench.host_overlap", f"--configs={name}", f"--json={f.name}",
                        f"--batches={','.join(FLAGS.batches)}", f"--runs={FLAGS.runs}",
                        f"--new_tokens={FLAGS.new_tokens}", "--header=false", f"--mtp={FLAGS.mtp}"]
                subprocess.run(args, check=True, timeout=3600)
                results += json.load(open(f.name))
    else:
        name = FLAGS.configs[0]
        llm = LLM(**build(name), scheduler_config=SchedulerConfig(prefill_budget=OFFLINE_PREFILL_BUDGET),
                  mtp=FLAGS.mtp)
        s = llm.scheduler
        for B in batches:
            V = llm.decode_engine.model_cfg.vocab_size
            prompts = [rng.integers(2, V, 32).tolist() for _ in range(B)]
            rounds = []
            for i in range(FLAGS.runs + 1):   # the first round warms up
                r = {}
                for mode in (False, True):
                    s.config = dataclasses.replace(s.config, overlap_decode=mode)
                    r[mode] = measure(llm, prompts, sp)
                rounds += [r] if i else []
            worst = {m: max(rounds, key=lambda r: r[m]["exposed_ms"])[m] for m in (False, True)}
            label = name + (" + MTP" if FLAGS.mtp else "")
            print(f"| {label} | {B} | {worst[False]['dispatches']} / {worst[True]['dispatches']} | "
                  f"{worst[False]['period_ms']:.2f} | {worst[False]['exposed_ms']:.2f} | "
                  f"{worst[True]['period_ms']:.2f} | {worst[True]['exposed_ms']:.2f} |", flush=True)
            results.append(dict(config=name, batch=B, rounds=[{str(k): v for k, v in r.items()} for r in rounds]))
        llm.close()
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
